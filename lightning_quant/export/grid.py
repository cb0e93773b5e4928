"""From a trained quantizer to the integer grid an exported graph applies, and that grid's quantize/dequantize.

Each quantizer class reports its own grid (``Quantizer.export_grid``); this module checks that the target can
hold it (8-bit containers, no per-group activations) and turns a refusal into an :class:`ExportError` naming
the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lightning_quant.export.errors import ExportError
from lightning_quant.quantizers import ObserverQuantizer, Quantizer
from lightning_quant.quantizers.grid import IntegerGrid, NoIntegerGrid


def integer_grid(q: Quantizer, name: str) -> IntegerGrid:
    """The per-tensor or per-channel integer grid a trained/calibrated quantizer applies; ExportError if none."""
    grid = q.export_grid()
    if isinstance(grid, NoIntegerGrid):
        raise ExportError(f"'{name}': {grid.reason}")
    if grid.group_size is not None:
        raise ExportError(
            f"'{name}': per-group grids (group_size={grid.group_size}) are exported for Linear weights only"
        )
    return grid


def check_8bit(grid: IntegerGrid, name: str) -> None:
    """Refuse a grid whose codes do not fit int8 or uint8."""
    if not grid.fits_8bit():
        raise ExportError(f"'{name}': grid [{grid.qmin}, {grid.qmax}] does not fit int8/uint8")


def full_range(grid: IntegerGrid) -> tuple[int, int]:
    """The code range of the grid's 8-bit container."""
    return (-128, 127) if grid.dtype == torch.int8 else (0, 255)


def _narrow(x: torch.Tensor, grid: IntegerGrid) -> torch.Tensor:
    """Clamp to a grid narrower than its 8-bit container (e.g. 4-bit activations): same codes, exportable ops."""
    if (grid.qmin, grid.qmax) == full_range(grid) or grid.axis is not None:
        return x
    lo = (grid.qmin - float(grid.zero_point)) * float(grid.scale)
    hi = (grid.qmax - float(grid.zero_point)) * float(grid.scale)
    return torch.clamp(x, lo, hi)


def activation_grid(q: Optional[Quantizer], name: str) -> Optional[IntegerGrid]:
    """The 8-bit grid of an enabled activation quantizer, a signed one shifted to start at 0 (x86 int8 kernels
    take uint8 activations; the codes are the same), or None."""
    if q is None or not q.fake_quant_enabled:
        return None
    grid = integer_grid(q, name)
    check_8bit(grid, name)
    if grid.dtype == torch.int8:
        shift = -grid.qmin
        grid = IntegerGrid(grid.scale, grid.zero_point + shift, 0, grid.qmax + shift, None)
    return grid


def quantize_dequantize(x: torch.Tensor, grid: Optional[IntegerGrid]) -> torch.Tensor:
    """``x`` on ``grid`` as a QuantizeLinear/DequantizeLinear pair (identity without a grid)."""
    if grid is None:
        return x
    ops = torch.ops.quantized_decomposed
    lo, hi = full_range(grid)
    s, zp = float(grid.scale), int(grid.zero_point)
    q = ops.quantize_per_tensor(_narrow(x, grid), s, zp, lo, hi, grid.dtype)
    return ops.dequantize_per_tensor(q, s, zp, lo, hi, grid.dtype)


def grid_codes(w: torch.Tensor, grid: IntegerGrid) -> torch.Tensor:
    """The integer codes of ``w`` on a per-tensor or per-channel grid (float tensor of whole numbers)."""
    shape = [1] * w.dim()
    if grid.axis is not None:
        shape[grid.axis] = -1
    s, zp = grid.scale.reshape(shape), grid.zero_point.reshape(shape)
    return torch.clamp(torch.round(w / s) + zp, grid.qmin, grid.qmax)


def weight_grid_of(weight: torch.Tensor) -> Optional[IntegerGrid]:
    """The per-tensor grid a float weight already lies on, or None: its smallest nonzero magnitude as the step,
    every weight an integer multiple of it, at most 32767 steps (INQ's powers of two, TWN/ELQ levels)."""
    w = weight.detach().float()
    nonzero = w.abs()[w != 0]
    if nonzero.numel() == 0:
        return None
    step = nonzero.min()
    codes = w / step
    top = float(codes.abs().max())
    if top > 32767 or not torch.equal(codes, codes.round()):
        return None
    bound = 127 if top <= 127 else 32767
    return IntegerGrid(step.reshape(()), torch.zeros((), dtype=torch.int32), -bound - 1, bound, None)


@dataclass
class BlockGrid:
    """Per-group weight grid of a Linear layer: codes (C, K), one scale and zero point per ``group`` inputs."""

    codes: torch.Tensor
    scale: torch.Tensor  # (C, K // group)
    zero_point: torch.Tensor  # (C, K // group)
    group: int
    qmin: int
    qmax: int

    @classmethod
    def from_quantizer(cls, q: ObserverQuantizer, w: torch.Tensor) -> BlockGrid:
        """The codes of weight ``w`` (C, K) on a per-group observer quantizer's grid (its fixed codes if set)."""
        rows, cols = w.shape
        codes = q.integer_codes(w).reshape(rows, cols)
        groups = cols // q.group_size
        scale = q.scale.detach().float().reshape(rows, groups)
        zp = q.zero_point.detach().reshape(rows, groups).to(torch.int64)
        return cls(codes.round().to(torch.int64), scale, zp, q.group_size, q.qmin, q.qmax)
