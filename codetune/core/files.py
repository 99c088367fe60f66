"""Writing files that readers may open at any moment (the data cache, a run directory)."""

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write text to path so that a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
