"""Pre-flight: what would make a run fail later, found before any server, GPU or hour is spent on it.

Config, model (a weights package, a complete directory, or a Hub id that answers), data source,
disk for checkpoints and the export, and a memory floor for the weights and optimizer state.

`codetune check` runs it, `codetune run` runs it before it starts Prefect, and the flow runs it as
its first task. Every error is gathered and reported at once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from codetune.core.config import Config, DataSource, ModelInit
from codetune.core.errors import CodetuneError
from codetune.core.weights import CACHE_DIR, is_packaged, locate

# How long a Hub id may take to answer before the run is told it cannot reach it.
HUB_TIMEOUT_S = 10
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "vocab.txt")


class PreflightError(CodetuneError):
    pass


def _local_model_errors(path: Path) -> list[str]:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer_config.json)")
    return [f"model.name='{path}' is a directory without {', '.join(missing)}"] if missing else []


def _hub_model_errors(name: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return []
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return [
            f"model.name='{name}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once online"
        ]
    try:
        HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # offline, unknown id, gated or private: the message says which
        reason = str(exc).splitlines()[0][:200]
        return [
            f"model.name='{name}' is neither a local directory nor reachable on the Hub "
            f"({type(exc).__name__}: {reason}); check the id and the network (or HF_TOKEN), "
            "or point model.name at a local directory"
        ]
    return []


def model_errors(cfg: Config) -> list[str]:
    """The pretrained model can be loaded: an installed weights package, a complete directory, or a Hub id."""
    model = cfg.model
    if model.init is ModelInit.scratch:
        return []
    if is_packaged(model.name):
        try:
            locate(model.name)
        except CodetuneError as exc:
            return [str(exc)]
        return []
    if Path(model.name).exists():
        return _local_model_errors(Path(model.name))
    return _hub_model_errors(model.name, model.revision)


def data_errors(cfg: Config) -> list[str]:
    """The data source is there and readable (a Hub dataset is checked by the data stage itself)."""
    from codetune.core.data.code_tree import default_tree, source_files
    from codetune.core.data.records import data_files

    data = cfg.data
    try:
        if data.source is DataSource.code_tree:
            root = Path(data.path) if data.path else default_tree()
            if not root.is_dir():
                return [f"data.path='{root}' is not a directory of Python source (data.source=code_tree)"]
            if not source_files(root):
                return [f"data.path='{root}' holds no Python files outside tests (data.source=code_tree)"]
        elif data.source is DataSource.files:
            unreadable = [str(f) for f in data_files(data.path) if not os.access(f, os.R_OK)]
            if unreadable:
                return [f"cannot read {', '.join(unreadable[:3])} (data.path): check the permissions"]
    except CodetuneError as exc:
        return [str(exc)]
    return []


def disk_errors(cfg: Config, weights_bytes: int | None) -> list[str]:
    """Room under training.output_dir for checkpoints and the export (needs the model's size, when known)."""
    if weights_bytes is None:
        return []
    # The export and its staging copy, and per kept checkpoint either an adapter (small) or the whole
    # model with its Adam state (3x the weights more).
    per_checkpoint = weights_bytes // 20 if cfg.peft.use_peft else 4 * weights_bytes
    needed = 2 * weights_bytes + cfg.training.save_total_limit * per_checkpoint
    where = Path(cfg.training.output_dir).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        return [
            f"training.output_dir ({where}) has {free / 1e9:.1f} GB free; this run needs about {needed / 1e9:.1f} GB "
            "for checkpoints and the export: free space, lower training.save_total_limit, or use LoRA"
        ]
    return []


def available_memory() -> tuple[int | None, str]:
    """(bytes, where): the GPU's memory when training would use one, else the memory this machine has free."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1], "GPU memory"
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None, "memory"
    kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
    return (kib * 1024 if kib else None), "free memory"


def memory_errors(cfg: Config, weights_bytes: int | None) -> list[str]:
    """The weights, and for full fine-tuning their gradients and Adam state, fit in memory.

    A floor, not a forecast: activations come on top and grow with the batch and sequence lengths.
    """
    available, where = available_memory()
    if weights_bytes is None or available is None:
        return []
    # fp32 weights; LoRA adds little beside them, full fine-tuning adds gradients and two Adam moments.
    needed = weights_bytes * (1.1 if cfg.peft.use_peft else 4)
    if needed > available:
        return [
            f"the model needs at least {needed / 1e9:.1f} GB to train, before activations; this machine has "
            f"{available / 1e9:.1f} GB of {where}: use LoRA (peft.use_peft=true), a smaller model, or a bigger machine"
        ]
    return []


def _weights_bytes(cfg: Config) -> int | None:
    """The model's weights on disk in fp32, where they are on this machine."""
    if cfg.model.init is ModelInit.scratch:
        return None
    if is_packaged(cfg.model.name):
        try:
            converted = CACHE_DIR / locate(cfg.model.name)[1].sha256[:16] / "model.safetensors"
        except CodetuneError:  # reported by model_errors
            return None
        return converted.stat().st_size if converted.is_file() else None
    path = Path(cfg.model.name)
    if path.is_dir():
        return sum(p.stat().st_size for pattern in WEIGHT_FILES for p in path.glob(pattern)) or None
    return None


def preflight_errors(cfg: Config) -> list[str]:
    """Every error a run of cfg would hit on this machine, found without loading the model."""
    weights_bytes = _weights_bytes(cfg)
    return model_errors(cfg) + data_errors(cfg) + disk_errors(cfg, weights_bytes) + memory_errors(cfg, weights_bytes)


def fail_on(errors: list[str]) -> None:
    """Raise one PreflightError listing every error, or return quietly."""
    if errors:
        raise PreflightError("pre-flight check failed:\n  " + "\n  ".join(errors))


def check(cfg: Config) -> None:
    fail_on(preflight_errors(cfg))
