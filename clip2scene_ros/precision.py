"""One ``precision`` for every component: ``auto``, ``fp32``, ``bf16`` or ``fp16``.

``auto`` takes the device's matrix units: bf16 on a CPU with AMX or AVX512-BF16, fp16 on CUDA,
fp32 otherwise. A CPU without those units emulates bf16 at a fraction of fp32's speed, so there
``auto`` stays fp32 and bf16 only runs when asked for.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from .errors import ConfigError
from .precision_names import DEFAULT_PRECISION, PRECISIONS

__all__ = ["DEFAULT_PRECISION", "DTYPES", "PRECISIONS", "check_precision", "cpu_has_fast_bf16",
           "resolve_precision"]

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: /proc/cpuinfo flags of units that run bf16 matrix products natively.
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _probe_fast_bf16() -> tuple[bool, str]:
    """(answer, how it was found): torch's own CPU probes, else /proc/cpuinfo."""
    cpu = getattr(torch, "cpu", None)
    probes = [(name, getattr(cpu, f"_is_{name}_supported", None))
              for name in ("amx_tile", "avx512_bf16")]
    found = [(name, fn) for name, fn in probes if callable(fn)]
    if found:
        units = [name for name, fn in found if fn()]
        return bool(units), f"torch.cpu: {', '.join(units) or 'no AMX, no AVX512-BF16'}"
    flags = sorted(_cpuinfo_flags() & set(FAST_BF16_FLAGS))
    return bool(flags), f"/proc/cpuinfo: {', '.join(flags) or 'no amx_bf16, no avx512_bf16'}"


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16); logged once."""
    fast, how = _probe_fast_bf16()
    log.info("CPU bf16 matrix units: %s (%s)", "yes" if fast else "no", how)
    return fast


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, "
                          f"got {precision!r}")
    return precision


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16``: ``precision`` itself unless it is ``auto``."""
    if check_precision(precision) != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "fp16"
    if kind == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"
