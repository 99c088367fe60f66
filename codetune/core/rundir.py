"""A run directory's layout: which file is which, how each is written, and when the run counts as done.

A run directory holds the exported model (what from_pretrained reads) beside the records of how it
was made and scored. Every record is written whole or not at all (staged, then renamed), and the
records written last mark a stage complete: training.json for training, metrics.json for evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from codetune.core.config import Config, Direction, content_hash
from codetune.core.errors import ConfigError
from codetune.core.families import family_of, source_files
from codetune.core.files import write_atomic

if TYPE_CHECKING:
    from codetune.core.data import PreparedData

log = logging.getLogger(__name__)

TRAINING_RECORD = "training.json"
"""Written last by training: the export is complete."""
FITTED_RECORD = "fitted.json"
"""Training ended and the adapter is saved; its merge into the export is still to do."""
METRICS_FILE = "metrics.json"
"""Written last by evaluation: the run is scored."""
CONFIG_FILE = "config.yaml"
DATA_MANIFEST = "data_manifest.json"
DATA_PROFILE = "data_profile.json"
"""The training data's profile: what `codetune monitor` measures drift against."""
TRAINER_STATE = "trainer_state.json"
EXAMPLES_FILE = "examples.json"
PREDICTIONS_FILE = "predictions.jsonl"
BENCHMARK_RESULTS = "benchmarks.jsonl"
"""Per benchmark problem: the completions and what running them gave."""
ADAPTER_DIR = "adapter"
EXPORT = "export"
"""Staged as .export, then moved into the run directory itself: the model files from_pretrained reads."""
CHECKPOINTS = "checkpoints"
RUN_KEY_FILE = "run_key.txt"
"""The hash of the settings that determine the weights: a run directory belongs to one configuration."""
RECIPE_FILE = "recipe.txt"
"""The hash of the code that trained it (recipe_code): a run of other code is neither resumed nor reused."""
RECIPE_MODULES = ("training.py", "model.py", "precision.py", "distributed.py", "weights.py")
"""The core modules that turn a configuration and data into weights, beside the family's own."""
LOCK_FILE = ".lock"
RECORDS = frozenset(
    {
        TRAINING_RECORD,
        FITTED_RECORD,
        TRAINER_STATE,
        CONFIG_FILE,
        DATA_MANIFEST,
        DATA_PROFILE,
        METRICS_FILE,
        EXAMPLES_FILE,
        PREDICTIONS_FILE,
        BENCHMARK_RESULTS,
        RUN_KEY_FILE,
        RECIPE_FILE,
    }
)


class RunDir:
    """One run's directory: output_dir/<run name>."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, cfg: Config, data: PreparedData) -> "RunDir":
        """The directory of the run this configuration and data make."""
        return cls(Path(cfg.training.output_dir) / run_name(cfg, data))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def trained(self) -> bool:
        return (self.path / TRAINING_RECORD).exists()

    @property
    def fitted(self) -> bool:
        return (self.path / FITTED_RECORD).exists()

    @property
    def evaluated(self) -> bool:
        return (self.path / METRICS_FILE).exists()

    def claim(self, key: str, recipe: str) -> None:
        """Make this directory the run of settings `key` trained by code `recipe`, refusing one that another
        configuration or other code made."""
        recorded, trained_by = self.path / RUN_KEY_FILE, self.path / RECIPE_FILE
        if recorded.exists() and recorded.read_text().strip() != key:
            raise ConfigError(
                f"{self.path} holds a run of a different configuration (model, LoRA, training or data settings "
                "differ): choose another training.run_name, or leave it null to name the run from its settings"
            )
        if recorded.exists() and (not trained_by.exists() or trained_by.read_text().strip() != recipe):
            raise ConfigError(
                f"{self.path} holds a run of this configuration trained by other codetune code (the training, model "
                "or family modules changed since), which would not resume into the same model: choose another "
                "training.run_name, or leave it null to train anew in a directory of its own"
            )
        if not recorded.exists():
            self._name_earlier_recipes(key)
        self.path.mkdir(parents=True, exist_ok=True)
        self.write(RUN_KEY_FILE, key)
        self.write(RECIPE_FILE, recipe)

    def _name_earlier_recipes(self, key: str) -> None:
        """Say which runs of this configuration other code trained: they are left as they are, not reused."""
        siblings = self.path.parent.glob(f"*/{RUN_KEY_FILE}") if self.path.parent.is_dir() else []
        earlier = sorted(str(s.parent) for s in siblings if s.read_text().strip() == key)
        if earlier:
            log.warning(
                "%s hold this configuration trained by other codetune code; not reused: training anew in %s",
                ", ".join(earlier),
                self.path,
            )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory alone: an identical run started meanwhile waits here, then finds the work done."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                log.warning("%s is in use by %s; waiting for it", self.path, handle.read().strip() or "another run")
                fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write(self, name: str, text: str) -> None:
        write_atomic(self.path / name, text)

    def write_json(self, name: str, value: Any) -> None:
        self.write(name, json.dumps(value, indent=2))

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def model_files(self) -> list[Path]:
        """The files from_pretrained needs (weights, config, tokenizer): not the run's records, not the adapter."""
        return sorted(
            p
            for p in self.path.iterdir()
            if p.is_file() and p.name not in RECORDS and not p.name.endswith(".tmp") and not p.name.startswith(".")
        )

    def staging(self, name: str) -> Path:
        """An empty hidden directory to assemble `name` in before it replaces the real one."""
        staged = self.path / f".{name}"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        return staged

    def install(self, staged: Path, name: str) -> None:
        """Replace directory `name` with the staged one in one rename."""
        shutil.rmtree(self.path / name, ignore_errors=True)
        os.replace(staged, self.path / name)

    def install_export(self) -> None:
        """Move the staged export's files (weights, config, tokenizer, trainer state) into the run directory."""
        staged = self.path / f".{EXPORT}"
        for item in staged.iterdir():
            target = self.path / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        staged.rmdir()

    def finish_training(self, record: dict) -> None:
        """Mark the export complete (training.json, last) and drop what only an unfinished run needs."""
        self.write_json(TRAINING_RECORD, record)
        (self.path / FITTED_RECORD).unlink(missing_ok=True)
        shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)


# Settings that change how a run is watched or stored, never its weights: left out of its key, so
# raising a timeout after a timed-out run resumes that run instead of starting another.
NOT_IN_RUN_KEY = (
    "output_dir",
    "run_name",
    "logging_steps",
    "dataloader_num_workers",
    "save_total_limit",
    "timeout_minutes",
)


def run_key(cfg: Config, data: PreparedData) -> str:
    """Hash of the settings that determine the trained weights: model, LoRA, training and FIM settings, data."""
    training = {k: v for k, v in dataclasses.asdict(cfg.training).items() if k not in NOT_IN_RUN_KEY}
    model, peft = dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.peft)
    settings = {"model": model, "peft": peft, "training": training, "data": data.fingerprint}
    if cfg.model.direction is Direction.fill_in_middle:  # only there: every other run keeps its name
        settings["fill_in_middle"] = dataclasses.asdict(cfg.fill_in_middle)
    return content_hash(settings)


@functools.cache
def recipe_code(family_class: type) -> str:
    """A hash of the code that turns a configuration and data into weights: the RECIPE_MODULES and the family's
    modules (its class's and its bases'). After a change there, the same configuration trains anew."""
    core = Path(__file__).parent
    modules = [core / m for m in RECIPE_MODULES] + [Path(m) for m in source_files(family_class)]
    return content_hash([m.read_text() for m in modules])


def run_name(cfg: Config, data: PreparedData) -> str:
    """training.run_name, or the model's name and a hash of the settings and the recipe code."""
    if cfg.training.run_name:
        return cfg.training.run_name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cfg.model.name.rsplit("/", 1)[-1]).strip("-").lower()
    recipe = recipe_code(type(family_of(cfg.model)))
    return f"{slug}-{content_hash([run_key(cfg, data), recipe])[:10]}"


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """Newest checkpoint whose trainer_state.json (the Trainer writes it last) is complete."""
    if not checkpoints.is_dir():
        return None
    found = []
    for path in checkpoints.glob("checkpoint-*"):
        try:
            json.loads((path / TRAINER_STATE).read_text())
            found.append((int(path.name.split("-")[1]), path))
        except (OSError, ValueError):
            log.warning("ignoring incomplete checkpoint %s", path)
    return max(found)[1] if found else None
