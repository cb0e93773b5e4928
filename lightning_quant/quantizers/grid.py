"""The integer grid a quantizer applies, as a quantizer reports it for export (``Quantizer.export_grid``).

Export turns a trained quantizer into integer codes plus scales (ONNX QuantizeLinear/DequantizeLinear, torch's
``quantized_decomposed`` ops); each quantizer class says which grid it applies, or why it has none, so export
never needs to know the classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass
class IntegerGrid:
    """``x ≈ (q − zero_point)·scale`` with integer codes ``q ∈ [qmin, qmax]`` and an integer zero point.

    Per tensor (``axis`` None: scalar scale and zero point), per channel along ``axis`` (one per channel), or per
    group (``group_size`` set: one per ``group_size`` consecutive elements of each row, flattened row-major).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor  # int32
    qmin: int
    qmax: int
    axis: Optional[int] = None
    group_size: Optional[int] = None

    @property
    def dtype(self) -> torch.dtype:
        """The 8-bit container of the codes: int8 for a grid with negative codes, else uint8."""
        return torch.int8 if self.qmin < 0 else torch.uint8

    def fits_8bit(self) -> bool:
        """True when every code fits int8 (a grid with negative codes) or uint8."""
        return not (self.qmin < -128 or self.qmax > 255 or (self.qmin < 0 and self.qmax > 127))


@dataclass(frozen=True)
class NoIntegerGrid:
    """Why a quantizer has no static integer grid (the export error message says this after the layer name)."""

    reason: str


ExportGrid = Union[IntegerGrid, NoIntegerGrid]


def grid_for(
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    granularity: str,
    axis: int,
    group_size: int,
) -> IntegerGrid:
    """An :class:`IntegerGrid` from a quantizer's scale and zero point vectors (one per group) and its granularity."""
    if granularity == "per_tensor":
        return IntegerGrid(scale.reshape(()), zero_point.reshape(()), qmin, qmax)
    if granularity == "per_group":
        return IntegerGrid(scale, zero_point, qmin, qmax, group_size=group_size)
    return IntegerGrid(scale, zero_point, qmin, qmax, axis)
