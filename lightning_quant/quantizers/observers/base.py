"""The observer base class: a range ``[min, max]`` per quantization group, kept in buffers (saved in checkpoints)
and synchronised across DDP ranks so that every rank quantizes with identical scales."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from lightning_quant.quantizers.finite import check_range
from lightning_quant.quantizers.functional import average_across_ranks, row_aminmax
from lightning_quant.quantizers.state import OptionalStateModule

# Above this many elements per row, percentile/MSE observers work on an evenly strided sample (speed).
MAX_SAMPLE = 1 << 18
# The histogram (KL) observer bins at most this many elements of each tensor; the range uses all of them.
MAX_HIST = 1 << 16
# Elements a deferred MSE search runs over (kept from all calibration batches).
MAX_SEARCH = 1 << 16


def sample_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every k-th column of ``rows`` so that at most ``MAX_SAMPLE`` remain (the statistics of a long row)."""
    step = max(1, math.ceil(rows.shape[1] / MAX_SAMPLE))
    return rows[:, ::step]


class Observer(OptionalStateModule):
    """Base class: ``forward(rows)`` updates the range from a ``(groups, N)`` view and returns nothing.

    ``plain_range`` observers use each batch's plain minimum and maximum, so a per-tensor range can be taken
    from the tensor as it is (:meth:`update`) instead of from a flattened view. Every range is checked before it
    is merged: a NaN or Inf input raises a ``NonFiniteInputError`` naming ``qualname`` (its quantizer) and leaves
    the buffers as they were.
    """

    plain_range: ClassVar[bool] = True
    fused_combine: ClassVar[bool] = False  # the fused per-tensor kernel computes combine() (min-max and EMA)
    # buffers (declared so that type checkers see tensors, not ``Module.__getattr__``'s ``Tensor | Module``)
    min_val: torch.Tensor
    max_val: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_groups: int = 1) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.full((num_groups,), float("inf")))
        self.register_buffer("max_val", torch.full((num_groups,), float("-inf")))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._has_range = False  # Python copy of count > 0: no tensor-to-bool sync (nor graph break) per step
        self.qualname = f"an unnamed {type(self).__name__}"  # the quantizer's name, set by it

    @property
    def has_range(self) -> bool:
        """True once at least one tensor was observed."""
        return self._has_range

    def _after_load(self) -> None:
        self._has_range = bool(self.count > 0)

    def mark_observed(self) -> None:
        """Note that the buffers now hold an observed range (written by a fused kernel, count included)."""
        self._has_range = True

    def _counted(self) -> None:
        """One more tensor observed. In place, and ``_has_range`` set once: ``Module.__setattr__`` costs more than
        the observation itself on small tensors."""
        self.count.add_(1)
        if not self._has_range:
            self._has_range = True

    def finalize(self) -> None:
        """Turn accumulated statistics into the final range (end of calibration; most observers: nothing)."""

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Range estimate from one batch; subclasses refine it."""
        return row_aminmax(rows)

    def checked_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`batch_range`, refused if not finite (a NaN or Inf in ``rows`` makes it so)."""
        lo, hi = self.batch_range(rows)
        check_range(lo, hi, self)
        return lo, hi

    @torch.no_grad()
    def forward(self, rows: torch.Tensor) -> None:
        self.update(*self.checked_range(rows))

    def update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Merge one batch's range (per-group vectors) into the running range."""
        self.combine(lo, hi)
        self._counted()

    @torch.no_grad()
    def reset_to(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Forget the history and hold exactly ``[lo, hi]`` (weights are re-observed from scratch each step)."""
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.count.fill_(1)
        if not self._has_range:
            self._has_range = True

    def combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Merge one batch's range into the running range: here a running mean of batch estimates."""
        if not self.has_range:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            return
        n = float(self.count)
        self.min_val.mul_(n / (n + 1)).add_(lo / (n + 1))
        self.max_val.mul_(n / (n + 1)).add_(hi / (n + 1))

    @torch.no_grad()
    def sync(self) -> None:
        """Average the range over DDP ranks (a no-op outside distributed runs)."""
        average_across_ranks([self.min_val, self.max_val])
