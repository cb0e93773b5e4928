"""Shape-only (fake) versions of the ``torch.ops.lightning_quant`` operators, for tracing with fake tensors.

``make_fx``, ``torch.export`` and ``torch.compile`` run an operator on fake tensors to learn its output's shape,
dtype and layout; these functions give them without computing. Autograd is registered in the C++ source
(``TORCH_LIBRARY_IMPL(lightning_quant, Autograd, ...)``), whose backward calls operators of this library too.
:func:`register` runs once, right after the library is loaded (``build.load()``).
"""

from __future__ import annotations

from typing import Any

import torch

_LIB = "lightning_quant::"


def laid_out(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The layout the kernels compute in (``laid_out`` in the C++): as it is, or contiguous."""
    as_is = x.is_contiguous() or (channels == 1 and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return x if as_is else x.contiguous()


def register() -> None:
    """Register the fake version of every operator of the library (call once, after loading it)."""

    @torch.library.register_fake(_LIB + "affine_fake_quant")
    def _affine(x: Any, scale: Any, zero_point: Any, channels: int, inner: int, qmin: int, qmax: int) -> Any:
        return torch.empty_like(laid_out(x, channels))

    @torch.library.register_fake(_LIB + "affine_forward")
    def _affine_forward(x: Any, scale: Any, zero_point: Any, channels: int, inner: int, qmin: int, qmax: int) -> Any:
        xd = laid_out(x, channels)
        return torch.empty_like(xd), torch.empty_like(xd)

    @torch.library.register_fake(_LIB + "lsq_fake_quant")
    def _lsq(
        x: Any, scale: Any, grad_factor: float, channels: int, inner: int, qmin: int, qmax: int, check: bool
    ) -> Any:
        return torch.empty_like(laid_out(x, channels))

    @torch.library.register_fake(_LIB + "lsq_forward")
    def _lsq_forward(x: Any, scale: Any, channels: int, inner: int, qmin: int, qmax: int, check: bool) -> Any:
        return torch.empty_like(laid_out(x, channels))

    @torch.library.register_fake(_LIB + "lsq_backward")
    def _lsq_backward(
        grad: Any, x: Any, scale: Any, grad_factor: float, channels: int, inner: int, qmin: int, qmax: int
    ) -> Any:
        return torch.empty_like(laid_out(x, channels)), torch.empty_like(scale)

    @torch.library.register_fake(_LIB + "observe_per_tensor")
    def _observe(x: Any, *buffers_and_options: Any) -> None:
        return None

    @torch.library.register_fake(_LIB + "observe_rows_symmetric")
    def _observe_rows(w: Any, *buffers_and_options: Any) -> None:
        return None
