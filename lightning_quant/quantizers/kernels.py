"""One-pass fake-quantization kernels for large CPU tensors, generated once by ``torch.compile``.

On CPU, torch's fused ``fake_quantize_*_cachemask`` kernels take several passes' worth of time per
activation tensor, which dominates a QAT step in eager mode. Here the forward (quantize, dequantize and
the clipping mask) and the backward (masked gradient, LSQ's step gradient) are each one pointwise kernel
that inductor generates the first time they are used (shapes are dynamic, so once per process).

They are used only where they pay: CPU tensors of at least ``MIN_NUMEL`` elements, outside an enclosing
``torch.compile`` (which fuses the reference ops itself). Set ``LIGHTNING_QUANT_KERNELS=eager`` to turn
them off; if compiling fails (no C++ compiler), a warning is given once and the reference ops are used.
Tensors are viewed as ``(outer, channels, inner)`` so one kernel serves every layout and channel axis.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, Optional

import torch

MIN_NUMEL = 1 << 18  # below this, the per-call cost of a compiled kernel outweighs its speed
_state: dict[str, Any] = {"enabled": os.environ.get("LIGHTNING_QUANT_KERNELS", "auto") != "eager", "fns": {}}


def _affine_forward(
    x: torch.Tensor, inv_scale: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    v = torch.round(x * inv_scale) + zero_point  # x * (1/s), as torch's fused kernels compute it
    return (torch.clamp(v, qmin, qmax) - zero_point) * scale


def _affine_backward(
    grad: torch.Tensor, x: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    # The clipping mask is recomputed from x: a bool output would make inductor's forward kernel ~10x slower.
    v = torch.round(x * inv_scale) + zero_point
    return torch.where((v >= qmin) & (v <= qmax), grad, torch.zeros_like(grad))


def _lsq_forward(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def _lsq_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> Any:
    v = x / scale
    inside = (v >= qmin) & (v <= qmax)
    q = torch.clamp(torch.round(v), qmin, qmax)
    # d out / d scale: round(v) - v inside the range, the clipped code outside (Esser et al., eq. 3)
    step_term = grad * torch.where(inside, q - v, q)
    return torch.where(inside, grad, torch.zeros_like(grad)), step_term.sum(dim=(0, 2))


_REFERENCE: dict[str, Callable[..., Any]] = {
    "affine_forward": _affine_forward,
    "affine_backward": _affine_backward,
    "lsq_forward": _lsq_forward,
    "lsq_backward": _lsq_backward,
}


def _kernel(name: str) -> Callable[..., Any]:
    fns = _state["fns"]
    if name not in fns:
        fns[name] = torch.compile(_REFERENCE[name], dynamic=True, fullgraph=True)
    return fns[name]


def _run(name: str, *args: Any) -> Any:
    """Run the compiled kernel ``name``; on a compile failure, warn once and fall back for good."""
    if _state["enabled"]:
        try:
            return _kernel(name)(*args)
        except Exception as err:  # noqa: BLE001 - any backend failure means: use the reference ops
            _state["enabled"] = False
            warnings.warn(
                f"lightning_quant: fused fake-quant kernels unavailable ({type(err).__name__}: {err}); "
                "using torch's reference ops (slower on CPU)",
                stacklevel=3,
            )
    return _REFERENCE[name](*args)


def applies(x: torch.Tensor) -> bool:
    """True where the one-pass kernels should be used for ``x``."""
    return (
        _state["enabled"]
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() >= MIN_NUMEL
        and not torch.compiler.is_compiling()
    )


def set_enabled(enabled: bool) -> None:
    """Switch the compiled kernels on or off for this process (tests compare both paths)."""
    _state["enabled"] = enabled


def _as_3d(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None:
        return x.reshape(1, 1, -1)
    outer = 1
    for d in x.shape[:axis]:
        outer *= d
    return x.reshape(outer, x.shape[axis], -1)


class _AffineFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> Any:
        inv_scale = 1.0 / scale
        ctx.save_for_backward(x, inv_scale, zp)
        ctx.qmin, ctx.qmax = qmin, qmax
        return _run("affine_forward", x, inv_scale, scale, zp, qmin, qmax)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, inv_scale, zp = ctx.saved_tensors
        return _run("affine_backward", grad.contiguous(), x, inv_scale, zp, ctx.qmin, ctx.qmax), None, None, None, None


class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, grad_factor: float, qmin: int, qmax: int) -> Any:
        ctx.save_for_backward(x, scale)
        ctx.grad_factor, ctx.qmin, ctx.qmax = grad_factor, qmin, qmax
        return _run("lsq_forward", x, scale, qmin, qmax)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, scale = ctx.saved_tensors
        grad_x, grad_s = _run("lsq_backward", grad.contiguous(), x, scale, ctx.qmin, ctx.qmax)
        return grad_x, (grad_s * ctx.grad_factor).reshape(scale.shape), None, None, None


def affine_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: Optional[int]
) -> torch.Tensor:
    """Fake-quantize ``x`` with fixed qparams (one per tensor if ``axis`` is None, else per channel of ``axis``).

    Same values as ``torch.fake_quantize_per_*_affine`` and the same straight-through gradient.
    """
    x3 = _as_3d(x, axis)
    view = (1, -1, 1)
    out = _AffineFakeQuant.apply(x3, scale.reshape(view).float(), zero_point.reshape(view).float(), qmin, qmax)
    return out.reshape(x.shape)


def lsq_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, grad_factor: float, qmin: int, qmax: int, axis: Optional[int]
) -> torch.Tensor:
    """LSQ fake quantization ``s·clamp(round(x/s))`` with the step gradient scaled by ``grad_factor``."""
    x3 = _as_3d(x, axis)
    out = _LSQFakeQuant.apply(x3, scale.reshape(1, -1, 1), grad_factor, qmin, qmax)
    return out.reshape(x.shape)
