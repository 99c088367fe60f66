"""Examples from a tree of Python source: (code without its docstring, docstring summary) pairs, the CodeSearchNet
recipe; or the whole files, for completion."""

from __future__ import annotations

import ast
import sysconfig
import textwrap
import tokenize
from collections import Counter
from pathlib import Path
from typing import Iterator

SKIPPED_DIRS = {"test", "tests", "idle_test", "testing", "site-packages", "dist-packages", "__pycache__"}


def default_tree() -> Path:
    """The running interpreter's stdlib: real, varied code that every machine has."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
    """Python files under root, tests and installed third-party packages excluded, in a stable order."""
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in SKIPPED_DIRS or p.startswith(".") for p in parts[:-1]):
            continue
        name = path.name
        if name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py":
            continue
        files.append(path)
    return sorted(files)


def first_paragraph(docstring: str) -> str:
    """The summary line(s) of a docstring, whitespace collapsed."""
    paragraph = docstring.strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split())


def strip_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The function's source without its docstring, dedented; None if that cannot be done cleanly."""
    doc = node.body[0]
    if len(node.body) < 2 or doc.lineno == node.lineno:
        return None  # a function that is only a docstring, or a one-line def: nothing to learn from
    before = lines[doc.lineno - 1][: doc.col_offset]
    after = lines[doc.end_lineno - 1][doc.end_col_offset :]
    if before.strip() or after.strip():
        return None  # the docstring shares its line with other code
    kept = lines[node.lineno - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    return textwrap.dedent("".join(kept)).rstrip() + "\n"


def documented_functions(source: str) -> Iterator[tuple[int, str, str, str]]:
    """(line, code without docstring, docstring summary, the function as written) for each documented function in
    source.

    Raises SyntaxError for source that does not parse.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        code = strip_docstring(node, lines)
        if code is not None:
            written = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).rstrip() + "\n"
            yield node.lineno, code, first_paragraph(docstring), written


def functions_in_source(source: str) -> Iterator[tuple[int, str, str]]:
    """(line, code without docstring, docstring summary) for each documented function in source."""
    for line, code, summary, _ in documented_functions(source):
        yield line, code, summary


def read_code_tree(root: Path, dropped: Counter, written: bool = False) -> Iterator[dict]:
    """Examples {code, summary, origin} from every documented function under root; written: with the function as
    written, its docstring in place, too."""
    for path in source_files(root):
        try:
            with tokenize.open(path) as f:  # honours PEP 263 encoding declarations
                source = f.read()
            found = list(documented_functions(source))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            dropped["unparsable_file"] += 1
            continue
        rel = path.relative_to(root)
        for line, code, summary, as_written in found:
            example = {"code": code, "summary": summary, "origin": f"{rel}:{line}"}
            yield example | {"written": as_written} if written else example


# StarCoder's filters of generated or data files: a line this long is not code anyone completes.
MAX_LINE_CHARS = 1000
MAX_FILE_BYTES = 1 << 20


def read_source_files(root: Path, dropped: Counter) -> Iterator[dict]:
    """Examples {code, origin}: every source file under root, whole."""
    for path in source_files(root):
        if path.stat().st_size > MAX_FILE_BYTES:
            dropped["file_too_large"] += 1
            continue
        try:
            with tokenize.open(path) as f:
                source = f.read()
        except (SyntaxError, UnicodeDecodeError, ValueError):
            dropped["unreadable_file"] += 1
            continue
        if max(map(len, source.splitlines()), default=0) > MAX_LINE_CHARS:
            dropped["generated_file"] += 1
            continue
        yield {"code": source, "origin": str(path.relative_to(root))}
