"""The fused CPU fake-quant kernels of ``csrc/fake_quant.cpp``: built once per machine, then loaded from cache.

Eager QAT calls each quantizer once per step on small tensors, where the fixed cost of every ATen call
dominates (see ``kernels``). These kernels observe, compute qparams and fake-quantize in one call, with the
same float32 arithmetic as the Python paths (tests compare them bit for bit). torch's C++ extension builder
compiles them the first time they are needed (about 30 s; ``make`` does it at install) into its cache
(``$TORCH_EXTENSIONS_DIR``). Where that fails (no C++ compiler), a warning is given once and the Python paths
are used. ``LIGHTNING_QUANT_KERNELS=eager`` turns them off, as it does the generated kernels.

The kernels are torch operators (``torch.ops.lightning_quant.*``), called through the dispatcher, so
``torch.jit.trace``, ``make_fx`` and ``torch.export`` record them; their fake (shape-only) versions are registered
here. A traced graph that holds them needs this module loaded (``native.module()``) where it runs. Usage::

    fused = native.module()  # None where unavailable
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


def _flags() -> tuple[str, list[str]]:
    """Extension name and compiler flags for this CPU class (AVX2 code only where torch itself uses it)."""
    # no fused multiply-add, so every operation rounds as in the tensor code; no FP traps, so comparisons vectorize
    flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "lightning_quant_fake_quant_avx2", [*flags, "-mavx2", "-mfma"]
    return "lightning_quant_fake_quant", flags


def module() -> Optional[Any]:
    """The compiled kernels, built on first use; None if turned off or unbuildable."""
    if not _state["enabled"]:
        return None
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get("LIGHTNING_QUANT_KERNELS", "auto") == "eager":
        return None
    from torch.utils import cpp_extension

    try:  # the ninja package's binary, which torch's builder looks for on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    name, flags = _flags()
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob(f"{name}*.so")):
            print("lightning-quant: building the fused CPU fake-quant kernels (once per machine)", file=sys.stderr)
        loaded = cpp_extension.load(name, [str(_SOURCE)], extra_cflags=flags, verbose=False)
        _register_fakes()
        _state["module"] = loaded  # only once everything it needs is in place
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: use the Python paths
        warnings.warn(
            f"lightning_quant: fused CPU fake-quant kernels unavailable ({type(err).__name__}: {err}); "
            "using the Python paths (slower eager QAT on CPU)",
            stacklevel=2,
        )
    return _state["module"]


def _laid_out(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The layout the kernels compute in (``laid_out`` in the C++): as it is, or contiguous."""
    as_is = x.is_contiguous() or (channels == 1 and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return x if as_is else x.contiguous()


def _register_fakes() -> None:
    """Shape-only versions of the operators, for tracing with fake tensors (make_fx, torch.export, torch.compile)."""
    lib = "lightning_quant::"

    @torch.library.register_fake(lib + "affine_fake_quant")
    def _affine(x: Any, scale: Any, zero_point: Any, channels: int, inner: int, qmin: int, qmax: int) -> Any:
        return torch.empty_like(_laid_out(x, channels))

    @torch.library.register_fake(lib + "affine_forward")
    def _affine_forward(x: Any, scale: Any, zero_point: Any, channels: int, inner: int, qmin: int, qmax: int) -> Any:
        xd = _laid_out(x, channels)
        return torch.empty_like(xd), torch.empty_like(xd)

    @torch.library.register_fake(lib + "lsq_fake_quant")
    def _lsq(
        x: Any, scale: Any, grad_factor: float, channels: int, inner: int, qmin: int, qmax: int, check: bool
    ) -> Any:
        return torch.empty_like(_laid_out(x, channels))

    @torch.library.register_fake(lib + "lsq_forward")
    def _lsq_forward(x: Any, scale: Any, channels: int, inner: int, qmin: int, qmax: int, check: bool) -> Any:
        return torch.empty_like(_laid_out(x, channels))

    @torch.library.register_fake(lib + "lsq_backward")
    def _lsq_backward(
        grad: Any, x: Any, scale: Any, grad_factor: float, channels: int, inner: int, qmin: int, qmax: int
    ) -> Any:
        return torch.empty_like(_laid_out(x, channels)), torch.empty_like(scale)

    @torch.library.register_fake(lib + "observe_per_tensor")
    def _observe(x: Any, *buffers_and_options: Any) -> None:
        return None

    @torch.library.register_fake(lib + "observe_rows_symmetric")
    def _observe_rows(w: Any, *buffers_and_options: Any) -> None:
        return None


def set_enabled(enabled: bool) -> None:
    """Use the kernels or the Python paths for this process (tests compare the two)."""
    _state["enabled"] = enabled
