"""Compiling and loading the fused CPU fake-quant kernels of ``csrc/fake_quant.cpp`` (built once per machine).

torch's C++ extension builder compiles them the first time they are needed (about 30 s; ``make`` does it at
install) into its cache (``$TORCH_EXTENSIONS_DIR``); it needs ninja for that and for every later load, so ninja
comes with the ``kernels`` extra (``pip install 'lightning-quant[kernels]'``). Where ninja, a C++ compiler or the
build is missing, one warning is given and the torch paths of :mod:`.ops` are used (same values, slower eager
QAT on CPU). ``LIGHTNING_QUANT_KERNELS=eager`` turns the kernels off. Once loaded, the operators are
``torch.ops.lightning_quant.*`` with their fake versions (:mod:`.fakes`) registered, so a traced graph that holds
them runs where this module has loaded them (``build.load()``).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

_SOURCE = Path(__file__).with_name("csrc") / "fake_quant.cpp"
_state: dict[str, Any] = {"tried": False, "module": None, "enabled": True}
INSTALL_HINT = "pip install 'lightning-quant[kernels]' (or: pip install ninja) for the fused CPU kernels"


def _flags() -> tuple[str, list[str]]:
    """Extension name and compiler flags for this CPU class (AVX2 code only where torch itself uses it)."""
    # no fused multiply-add, so every operation rounds as in the tensor code; no FP traps, so comparisons vectorize
    flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "lightning_quant_fake_quant_avx2", [*flags, "-mavx2", "-mfma"]
    return "lightning_quant_fake_quant", flags


def _ninja_on_path() -> bool:
    """Put the ninja package's binary on PATH (torch's builder looks there); True if ninja can be run."""
    from torch.utils import cpp_extension

    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass  # a system ninja on PATH serves too
    return cpp_extension.is_ninja_available()


def _unavailable(reason: str) -> None:
    warnings.warn(
        f"lightning_quant: fused CPU fake-quant kernels unavailable ({reason}); using the torch paths "
        f"(same values, slower eager QAT on CPU). {INSTALL_HINT}",
        stacklevel=3,
    )


def load() -> Optional[Any]:
    """The compiled kernels' Python module, built on first use; None if turned off or unavailable (warned once)."""
    if not _state["enabled"]:
        return None
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get("LIGHTNING_QUANT_KERNELS", "auto") == "eager":
        return None
    if not _ninja_on_path():
        _unavailable("ninja is not installed")
        return None
    from torch.utils import cpp_extension

    from lightning_quant.quantizers._kernels import fakes

    name, flags = _flags()
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob(f"{name}*.so")):
            print("lightning-quant: building the fused CPU fake-quant kernels (once per machine)", file=sys.stderr)
        loaded = cpp_extension.load(name, [str(_SOURCE)], extra_cflags=flags, verbose=False)
        fakes.register()
        _state["module"] = loaded  # only once everything it needs is in place
    except Exception as err:  # noqa: BLE001 - no compiler, a failed build: use the torch paths
        _unavailable(f"{type(err).__name__}: {err}")
    return _state["module"]


def set_enabled(enabled: bool) -> None:
    """Use the kernels or the torch paths for this process (tests compare the two)."""
    _state["enabled"] = enabled
