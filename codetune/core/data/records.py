"""Examples from local jsonl/csv/parquet files and from Hugging Face datasets.

Reads CodeSearchNet / CodeXGLUE code-to-text rows as they are: `code`/`docstring`
or the pre-tokenised `code_tokens`/`docstring_tokens`.
"""

from __future__ import annotations

import ast
import csv
import glob
import gzip
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from codetune.core.data.code_tree import first_paragraph, strip_docstring
from codetune.core.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")


def data_files(path: str) -> list[Path]:
    """A file, every supported file in a directory, or a glob's matches; sorted."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES)]
    elif any(c in path for c in "*?["):
        files = [Path(f) for f in glob.glob(path, recursive=True)]
    else:
        files = [p] if p.exists() else []
    if not files:
        raise DataError(f"no data files at data.path='{path}' (expected {', '.join(SUFFIXES)}, a directory or a glob)")
    unsupported = [f for f in files if not f.name.endswith(SUFFIXES)]
    if unsupported:
        raise DataError(f"{unsupported[0]}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return sorted(files)


# The csv module's default (128 KiB) refuses fields that a long function reaches.
CSV_FIELD_LIMIT = 64 * 1024 * 1024


def _decoded_lines(lines: Iterable[bytes], undecodable: set[int]) -> Iterator[str]:
    """Each line as text; a line that is not UTF-8 is noted in undecodable (by its 1-based number) and replaced."""
    for number, raw in enumerate(lines, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            undecodable.add(number)
            yield raw.decode("utf-8", errors="replace")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    undecodable: set[int] = set()
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
        for lineno, line in enumerate(_decoded_lines(f, undecodable), 1):
            if lineno in undecodable:
                yield lineno, ValueError("not UTF-8 text")
            elif line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, ValueError(f"not valid JSON ({exc.msg})")


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows by the line they start on; a record with a line that is not UTF-8, or that csv refuses, is an error."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    undecodable: set[int] = set()
    with open(path, "rb") as f:
        reader = csv.reader(_decoded_lines(f, undecodable))
        header = next(reader, [])
        start = reader.line_num
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start + 1, ValueError(f"not valid CSV ({exc})")
            else:
                if undecodable.intersection(range(start + 1, reader.line_num + 1)):
                    yield start + 1, ValueError("not UTF-8 text")
                else:
                    yield start + 1, dict(zip(header, values))
            start = reader.line_num


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, raw row) pairs; a row that does not parse or decode is yielded as an exception."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        yield from _jsonl_rows(path)
    elif name.endswith(".csv"):
        yield from _csv_rows(path)
    else:
        import pyarrow.parquet as pq

        rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for row in batch.to_pylist())
        yield from enumerate(rows, 1)


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return " ".join(value)  # *_tokens fields
    return None


def code_without_docstring(code: str, docstring: str) -> str:
    """CodeSearchNet's `code` still contains the docstring; strip it or the model learns to copy."""
    try:
        tree = ast.parse(code)
        fn = tree.body[0] if len(tree.body) == 1 else None
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(fn):
            stripped = strip_docstring(fn, code.splitlines(keepends=True))
            if stripped is not None:
                return stripped
    except SyntaxError:
        pass  # another language, or a fragment
    if docstring.strip() and docstring in code:
        # Drop the docstring and the quote or comment marks around it.
        pattern = r"(\"\"\"|'''|/\*\*?)?\s*" + re.escape(docstring) + r"\s*(\"\"\"|'''|\*/)?"
        return re.sub(pattern, "", code, count=1)
    return code


def to_example(
    row: Any, input_field: str, target_field: str, labelled: bool = False, tests_field: str | None = None
) -> dict:
    """A raw row as {code, summary} (and its tests where tests_field names them), or {code, label} when labelled;
    raises ValueError naming what is wrong with the row."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with fields, got {type(row).__name__}")
    missing = [f for f in (input_field, target_field, tests_field) if f and f not in row]
    if missing:
        raise ValueError(
            f"missing field {', '.join(repr(m) for m in missing)} "
            f"(row has {', '.join(map(repr, row)) or 'no fields'}); "
            "set data.input_field / data.target_field / data.tests_field"
        )
    if labelled:
        code, label = _text(row[input_field]), row[target_field]
        if code is None or not isinstance(label, (str, int, bool)) or label == "":
            bad = input_field if code is None else target_field
            raise ValueError(
                f"field '{bad}' must be {'text' if code is None else 'a label (text or integer)'}, got {row[bad]!r:.40}"
            )
        return {"code": code, "label": str(label)}
    code, target = _text(row[input_field]), _text(row[target_field])
    if code is None or target is None:
        bad = input_field if code is None else target_field
        raise ValueError(f"field '{bad}' must be text or a list of tokens, got {type(row[bad]).__name__}")
    example = {"code": code_without_docstring(code, target), "summary": first_paragraph(target)}
    if tests_field:
        tests = row[tests_field]
        if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
            tests = "\n".join(tests)  # MBPP's test_list: one assert each
        if not isinstance(tests, str) or not tests.strip():
            raise ValueError(f"field '{tests_field}' must be test code (text, or a list of asserts), got {tests!r:.40}")
        example["tests"] = tests
    return example


def read_examples(
    rows: Iterable[tuple[str, str | None, Any]],
    input_field: str,
    target_field: str,
    skip_invalid: bool,
    dropped: Counter,
    labelled: bool = False,
    tests_field: str | None = None,
) -> Iterator[dict]:
    """Examples from (origin, published split, raw row) triples; a bad row fails the run or, with skip_invalid, is
    counted."""
    return read_rows(rows, lambda row: to_example(row, input_field, target_field, labelled, tests_field),
                     skip_invalid, dropped, "invalid_row")  # fmt: skip


def read_rows(
    rows: Iterable[tuple[str, str | None, Any]],
    convert: Callable[[Any], dict],
    skip_invalid: bool,
    dropped: Counter,
    invalid: str,
) -> Iterator[dict]:
    """convert(row) for each (origin, published split, raw row); a row it refuses (ValueError) fails the run with its
    origin (file:line) and the reason or, with skip_invalid, is counted as `invalid`."""
    for origin, split, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            example = convert(row)
        except ValueError as exc:
            if not skip_invalid:
                raise DataError(
                    f"{origin}: {exc}. Fix the row, or set data.skip_invalid=true to skip and count such rows"
                ) from None
            dropped[invalid] += 1
            continue
        example["origin"] = origin
        if split:
            example["published_split"] = split
        yield example


# How CodeSearchNet, CodeXGLUE and Hub datasets name their splits.
SPLIT_NAMES = {"train": "train", "valid": "validation", "validation": "validation", "dev": "validation", "test": "test"}


def split_of(name: str) -> str | None:
    """The split a file or Hub split name stands for: test.jsonl, python_valid_0.jsonl.gz, jsonl/train/... ; None if
    none."""
    for part in reversed(Path(name).parts):
        for token in reversed(re.split(r"[^a-z]+", part.lower())):
            if token in SPLIT_NAMES:
                return SPLIT_NAMES[token]
    return None


def file_rows(files: list[Path]) -> Iterator[tuple[str, str | None, Any]]:
    for path in files:
        split = split_of(str(path))
        for lineno, row in _rows(path):
            yield f"{path}:{lineno}", split, row


def hub_rows(name: str, subset: str | None) -> Iterator[tuple[str, str | None, Any]]:
    """Every split of a Hugging Face dataset, each row with the split it was published in."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("data.source=hub needs the `datasets` package: pip install 'codetune[data]'") from None
    splits = load_dataset(name, subset)
    for split_name, split in splits.items():
        for i, row in enumerate(split):
            yield f"{name}[{split_name}]:{i}", split_of(split_name), row
