"""Which floating-point precision training runs in on this device."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from codetune.core.config import Config

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX) and oneDNN may use it. A oneDNN held to
    AVX2 (ONEDNN_MAX_CPU_ISA) computes bf16 in reference kernels, far slower than fp32 (docs/cpu-speed.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(cfg: Config) -> tuple[bool, bool]:
    """(bf16, fp16) for this device: bf16 wherever the GPU or CPU computes it natively, unless turned off."""
    t = cfg.training
    if not torch.cuda.is_available():
        if t.fp16:
            log.warning("training.fp16=true needs a CUDA GPU; none found, training without it")
        if t.bf16 and not cpu_has_bf16():
            log.warning("training.bf16=true on a CPU without bf16 instructions is slower than fp32; training in fp32")
            return False, False
        return (cpu_has_bf16() if t.bf16 is None else t.bf16), False
    if t.fp16:
        return False, True
    supported = torch.cuda.is_bf16_supported()
    if t.bf16 and not supported:
        log.warning("this GPU has no bf16; training with fp16 instead (set training.fp16=true to silence this)")
        return False, True
    return (supported if t.bf16 is None else t.bf16), False
