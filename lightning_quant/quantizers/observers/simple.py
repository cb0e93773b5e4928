"""The observers that follow the data directly: running min-max, its moving average, and a percentile clip."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_quant.quantizers.finite import check_range
from lightning_quant.quantizers.functional import is_distributed, row_aminmax
from lightning_quant.quantizers.observers.base import Observer, sample_rows


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything seen (exact, but sensitive to outliers)."""

    fused_combine = True

    def combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    @torch.no_grad()
    def sync(self) -> None:
        """Global min and max over DDP ranks."""
        if not is_distributed():
            return
        dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX)


class EMAObserver(Observer):
    """Exponential moving average of per-batch min/max, the usual choice for activations during QAT.

    Each step moves the range by ``momentum·(batch - running)``, written as separate float32 operations (not
    ``lerp``, which may fuse them) so that the fused kernel's scalar arithmetic gives the same bits.
    """

    fused_combine = True

    def __init__(self, num_groups: int = 1, momentum: float = 0.01) -> None:
        super().__init__(num_groups)
        self.momentum = momentum

    def combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if not self.has_range:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            return
        self.min_val.add_((lo - self.min_val).mul_(self.momentum))
        self.max_val.add_((hi - self.max_val).mul_(self.momentum))


class PercentileObserver(Observer):
    """Clips the range at the ``percentile``-th percentile of each batch (averaged over batches)."""

    plain_range = False

    def __init__(self, num_groups: int = 1, percentile: float = 99.99) -> None:
        super().__init__(num_groups)
        self.percentile = percentile

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_range(*row_aminmax(rows), self)  # a percentile can step over an Inf: check all of rows
        rows = sample_rows(rows.detach().float())
        q = self.percentile / 100.0
        hi = torch.quantile(rows, q, dim=1)
        lo = torch.quantile(rows, 1.0 - q, dim=1)
        return lo, hi
