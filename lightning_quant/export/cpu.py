"""The CPU capability probe: whether this CPU's int8 kernels may saturate (x86 without VNNI)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def int8_saturation_risk() -> bool:
    """True on x86 CPUs without VNNI (AVX2 only), whose int8 kernels add u8·s8 products in saturating 16-bit pairs."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")
    return "vnni" not in flags and "amx_int8" not in flags
