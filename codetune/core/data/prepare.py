"""The data stage: read a source, filter, deduplicate, split by content hash, and cache the splits."""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Iterator

from codetune.core.config import DataConfig, DataSource, content_hash
from codetune.core.data import conversations
from codetune.core.data.code_tree import default_tree, read_code_tree, read_source_files, source_files
from codetune.core.data.conversations import code_conversations, read_conversations
from codetune.core.data.profile import example_text, function_key, profile_splits
from codetune.core.data.records import data_files, file_rows, hub_rows, read_examples
from codetune.core.errors import DataError
from codetune.core.files import write_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
PROFILE_FILE = "profile.json"
"""What the drift monitor compares a source with (codetune.core.data.profile)."""
MANIFEST_FILE = "manifest.json"
"""The data cache entry's counts and content hashes (a run keeps a copy as rundir.DATA_MANIFEST)."""


class Examples(str, Enum):
    """What one example is: the shape a family trains on (Family.examples), which data preparation reads for."""

    pairs = "pairs"
    """{code, summary}: a function and its docstring's summary, or a source's input and target fields."""
    labelled = "labelled"
    """{code, label}: a source's input and label fields (classification)."""
    whole_files = "whole_files"
    """{code, origin}: a code tree's files, so a split holds whole files and the test split's are unseen code."""
    conversations = "conversations"
    """{messages, origin}: system, user and assistant turns (model.direction=chat), from rows in a conversation format
    or built from a code tree's functions."""


@dataclass
class PreparedData:
    """Where the splits are, and what went into them."""

    directory: str
    fingerprint: str
    """Hash of the source content and the data settings; names the cache directory."""
    counts: dict
    sha256: dict[str, str]
    """Content hash of each split file: identifies the test split that metrics were computed on."""

    def split_path(self, split: str) -> Path:
        return Path(self.directory) / f"{split}.jsonl"

    @classmethod
    def open(cls, directory: str | Path) -> "PreparedData":
        """Splits prepare_data wrote earlier, from their directory's manifest."""
        manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text())
        return cls(str(directory), manifest["fingerprint"], manifest["counts"], manifest["sha256"])

    @property
    def manifest_path(self) -> Path:
        return Path(self.directory) / MANIFEST_FILE

    @property
    def profile_path(self) -> Path:
        return Path(self.directory) / PROFILE_FILE

    def load(self, split: str) -> list[dict]:
        with open(self.split_path(split), encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def _source_files(cfg: DataConfig) -> list[Path]:
    if cfg.source is DataSource.code_tree:
        root = Path(cfg.path) if cfg.path else default_tree()
        if not root.is_dir():
            raise DataError(f"data.path='{root}' is not a directory of Python source (data.source=code_tree)")
        return source_files(root)
    if cfg.source is DataSource.files:
        return data_files(cfg.path)
    return []


def _settings_hash(cfg: DataConfig, examples: Examples) -> str:
    # Written as it was before Examples, so caches and run directories made then keep their names.
    labelled, whole_files = examples is Examples.labelled, examples is Examples.whole_files
    shape = {"whole_files": 1} if whole_files else {}
    if examples is Examples.conversations:  # how rows become conversations is part of what the data is
        shape = {"conversations": content_hash(Path(conversations.__file__).read_text())}
    return content_hash({"data": dataclasses.asdict(cfg), "labelled": labelled} | shape)


def source_fingerprint(cfg: DataConfig, examples: Examples) -> str:
    """Hash of the data settings and of every source file's content: unchanged data, same hash."""
    digest = hashlib.sha256(_settings_hash(cfg, examples).encode())
    for path in _source_files(cfg):
        digest.update(str(path).encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                digest.update(chunk)
    return digest.hexdigest()


def _read(cfg: DataConfig, dropped: Counter, examples: Examples):
    if cfg.source is DataSource.code_tree:
        root = Path(cfg.path) if cfg.path else default_tree()
        if examples is Examples.whole_files:
            return read_source_files(root, dropped)
        if examples is Examples.conversations:  # about the functions the data.* filters keep
            functions = _filtered(read_code_tree(root, dropped, written=True), cfg, dropped, Counter())
            return code_conversations(functions)
        return read_code_tree(root, dropped)
    rows = file_rows(data_files(cfg.path)) if cfg.source is DataSource.files else hub_rows(cfg.path, cfg.hub_subset)
    if examples is Examples.conversations:
        return read_conversations(rows, cfg.conversation_format, cfg.skip_invalid, dropped)
    target = cfg.label_field if examples is Examples.labelled else cfg.target_field
    return read_examples(
        rows, cfg.input_field, target, cfg.skip_invalid, dropped, examples is Examples.labelled, cfg.tests_field
    )


def _drop_reason(example: dict, cfg: DataConfig) -> str | None:
    if "messages" in example:  # a conversation: its turns were checked as it was read
        return None
    if "summary" not in example and "label" not in example:  # a whole file: data.max_code_lines is for functions
        return None if example["code"].strip() else "empty_code"
    if "summary" in example:
        words = len(example["summary"].split())
        if words < cfg.min_summary_words:
            return "summary_too_short"
        if words > cfg.max_summary_words:
            return "summary_too_long"
    if not example["code"].strip():
        return "empty_code"
    if example["code"].count("\n") > cfg.max_code_lines:
        return "code_too_long"
    return None


def _filtered(examples: Iterable[dict], cfg: DataConfig, dropped: Counter, tally: Counter) -> Iterator[dict]:
    """The examples that pass the data.* filters; counts those read and kept in tally."""
    for example in examples:
        tally["read"] += 1
        reason = _drop_reason(example, cfg)
        if reason:
            dropped[reason] += 1
        else:
            tally["kept"] += 1
            yield example


def uses_published_splits(examples: Iterable[dict]) -> bool:
    """Every example names the split its source published it in, and those include train and test."""
    published = {ex.get("published_split") for ex in examples}
    return None not in published and {"train", "test"} <= published


def select_examples(examples: Iterable[dict], max_examples: int | None, dropped: Counter) -> dict[str, dict]:
    """Examples by content key, duplicates (the same function by profile.function_key, with the same target)
    dropped; with max_examples, those whose key ranks lowest by a second slice of the hash.

    Read as a stream: only the chosen examples (a bounded heap) and the digests seen stay in memory. The
    subset is not the first max_examples read, which would be the first files (often train.jsonl alone).
    """
    seen: set[tuple[str, str]] = set()
    chosen: list[tuple[int, str, dict]] = []  # a max-heap on rank: (-rank, key, example)
    for example in examples:
        target = str(example.get("summary", example.get("label")))
        same = (function_key(example_text(example)), target)
        if same in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(same)
        digest = hashlib.sha256(f"{example_text(example)}\0{target}".encode()).digest()
        key = digest.hex()
        entry = (-int(key[16:32], 16), key, example)
        if max_examples is None or len(chosen) < max_examples:
            heapq.heappush(chosen, entry)
        elif entry > chosen[0]:
            heapq.heapreplace(chosen, entry)
    if len(seen) > len(chosen):
        dropped["over_max_examples"] += len(seen) - len(chosen)
    return {key: example for _, key, example in chosen}


def _selected(cfg: DataConfig, examples: Examples) -> tuple[dict[str, dict], Counter, Counter]:
    """select_examples' answer for cfg's source after the filters, with the drop reasons and the read/kept tally."""
    dropped, tally = Counter(), Counter()
    examples = _filtered(_read(cfg, dropped, examples), cfg, dropped, tally)
    return select_examples(examples, cfg.max_examples, dropped), dropped, tally


def read_source(cfg: DataConfig, examples: Examples) -> list[dict]:
    """The examples prepare_data would split, unsplit: the same filters, deduplication and max_examples."""
    _source_files(cfg)  # a missing path is named here, not found empty
    keyed, dropped, tally = _selected(cfg, examples)
    examples = list(keyed.values())
    if not examples:
        raise DataError(
            f"no examples in {cfg.path or default_tree()} ({tally['read']} read, dropped: {dict(dropped)}): "
            "point data.path at a source with documented functions, or relax the data.* filters"
        )
    return examples


def split_examples(keyed: dict[str, dict], cfg: DataConfig, dropped: Counter) -> dict[str, list[dict]]:
    """The source's own train/validation/test split where it publishes one; else a deterministic split by content hash.

    keyed: select_examples' answer. Keeping a published test split keeps scores comparable with published
    ones (CodeXGLUE). Validation/test examples whose whitespace-normalised code also appears in train are
    dropped: a model that saw the code in training would be scored on recall.
    """
    keys = sorted(keyed)
    use_published = uses_published_splits(keyed.values())
    lend_validation = use_published and all(keyed[k]["published_split"] != "validation" for k in keys)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for key in keys:
        example = dict(keyed[key])
        published = example.pop("published_split", None)
        bucket = int(key[:8], 16) / 16**8
        if not use_published:
            split = (
                "test"
                if bucket < cfg.test_fraction
                else ("validation" if bucket < cfg.test_fraction + cfg.validation_fraction else "train")
            )
        elif published == "train" and lend_validation and bucket < cfg.validation_fraction:
            split = "validation"  # a source without a validation split lends some of train
        else:
            split = published
        splits[split].append({"id": key[:16], **example})
    train_code = {function_key(example_text(ex)) for ex in splits["train"]}
    for split in ("validation", "test"):
        kept = [ex for ex in splits[split] if function_key(example_text(ex)) not in train_code]
        dropped[f"{split}_code_in_train"] += len(splits[split]) - len(kept)
        splits[split] = kept
    return splits


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(payload)
    return hashlib.sha256(payload).hexdigest()


def prepare_data(cfg: DataConfig, examples: Examples) -> PreparedData:
    """Read, filter, deduplicate and split cfg's source into cache_dir/<fingerprint>/; reuse it if already there.

    examples: the shape the run's family trains on (Family.examples).
    """
    # A hub dataset cannot be hashed without downloading it; its name and the settings stand in.
    fingerprint = (
        source_fingerprint(cfg, examples) if cfg.source is not DataSource.hub else _settings_hash(cfg, examples)
    )
    directory = Path(cfg.cache_dir) / fingerprint[:16]
    manifest_path = directory / MANIFEST_FILE
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        log.info("data unchanged (fingerprint %s): reusing %s", fingerprint[:16], directory)
        prepared = PreparedData(str(directory), fingerprint, manifest["counts"], manifest["sha256"])
        if not prepared.profile_path.exists():  # prepared before profiles were written
            profile = profile_splits({s: prepared.load(s) for s in SPLITS})
            write_atomic(prepared.profile_path, json.dumps(profile))
        return prepared

    keyed, dropped, tally = _selected(cfg, examples)
    split_by = "published splits" if uses_published_splits(keyed.values()) else "content hash"
    splits = split_examples(keyed, cfg, dropped)
    read = tally["read"]
    for split in SPLITS:
        if not splits[split]:
            raise DataError(
                f"the {split} split is empty ({read} examples read, {tally['kept']} kept after filters: "
                f"{dict(dropped)}); point data.path at more data or relax the data.* filters"
            )

    # Written beside the final directory and renamed into place, so a crash never leaves a
    # directory that looks like a complete cache entry.
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    counts = {"read": read, "kept": {s: len(splits[s]) for s in SPLITS}, "dropped": dict(sorted(dropped.items()))}
    manifest = {
        "fingerprint": fingerprint,
        "source": cfg.source.value,
        "path": cfg.path or str(default_tree()),
        "split_by": split_by,
        "counts": counts,
        "sha256": {s: _write_jsonl(staging / f"{s}.jsonl", splits[s]) for s in SPLITS},
    }
    (staging / PROFILE_FILE).write_text(json.dumps(profile_splits(splits)))
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    try:
        os.rename(staging, directory)
    except OSError:  # another process prepared the same data first
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "data: read %d, kept %s (split by %s), dropped %s",
        read,
        counts["kept"],
        manifest["split_by"],
        counts["dropped"],
    )
    return PreparedData(str(directory), fingerprint, counts, manifest["sha256"])
