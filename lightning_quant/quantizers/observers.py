"""Range observers: estimate ``[min, max]`` per quantization group from the tensors they see.

Each observer keeps its range in buffers (saved in checkpoints) and can synchronise it across DDP ranks,
so every rank quantizes with identical scales. Usage::

    obs = build_observer("ema", num_groups=1)
    obs(x.reshape(1, -1))
    lo, hi = obs.min_val, obs.max_val
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from lightning_quant.quantizers.functional import (
    average_across_ranks,
    int_range,
    is_distributed,
    qparams_from_range,
    row_aminmax,
)
from lightning_quant.quantizers.state import OptionalStateModule

# Above this many elements per row, percentile/MSE observers work on an evenly strided sample (speed).
_MAX_SAMPLE = 1 << 18


def _sample(rows: torch.Tensor) -> torch.Tensor:
    step = max(1, math.ceil(rows.shape[1] / _MAX_SAMPLE))
    return rows[:, ::step]


class Observer(OptionalStateModule):
    """Base class: ``forward(rows)`` updates the range from a ``(groups, N)`` view and returns nothing."""

    def __init__(self, num_groups: int = 1) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.full((num_groups,), float("inf")))
        self.register_buffer("max_val", torch.full((num_groups,), float("-inf")))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def has_range(self) -> bool:
        """True once at least one tensor was observed."""
        return bool(self.count > 0)

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Range estimate from one batch; subclasses refine it."""
        return row_aminmax(rows)

    @torch.no_grad()
    def forward(self, rows: torch.Tensor) -> None:
        lo, hi = self.batch_range(rows)
        self.combine(lo, hi)
        self.count += 1

    @torch.no_grad()
    def reset_to(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Forget the history and hold exactly ``[lo, hi]`` (weights are re-observed from scratch each step)."""
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.count.fill_(1)

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


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything seen (exact, but sensitive to outliers)."""

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
    """Exponential moving average of per-batch min/max, the usual choice for activations during QAT."""

    def __init__(self, num_groups: int = 1, momentum: float = 0.01) -> None:
        super().__init__(num_groups)
        self.momentum = momentum

    def combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if not self.has_range:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            return
        self.min_val.lerp_(lo, self.momentum)
        self.max_val.lerp_(hi, self.momentum)


class PercentileObserver(Observer):
    """Clips the range at the ``percentile``-th percentile of each batch (averaged over batches)."""

    def __init__(self, num_groups: int = 1, percentile: float = 99.99) -> None:
        super().__init__(num_groups)
        self.percentile = percentile

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _sample(rows.detach().float())
        q = self.percentile / 100.0
        hi = torch.quantile(rows, q, dim=1)
        lo = torch.quantile(rows, 1.0 - q, dim=1)
        return lo, hi


class MSEObserver(Observer):
    """Shrinks the min-max range to the clip that minimises the L_p quantization error (grid search).

    As in QDrop's calibration: ``candidates`` evenly spaced clip ratios in ``(0, 1]`` with ``p = 2.4``.
    The search assumes the bit width and sign of the quantizer that owns the observer.
    """

    def __init__(
        self, num_groups: int = 1, bits: int = 8, signed: bool = True, p: float = 2.4, candidates: int = 100
    ) -> None:
        super().__init__(num_groups)
        self.bits, self.signed, self.p, self.candidates = bits, signed, p, candidates

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _sample(rows.detach().float())
        lo0, hi0 = row_aminmax(rows)
        qmin, qmax = int_range(self.bits, self.signed and bool((lo0 < 0).any()))
        best_err = torch.full_like(lo0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for i in range(1, self.candidates + 1):
            ratio = i / self.candidates
            lo, hi = lo0 * ratio, hi0 * ratio
            scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric=False)
            scale, zp = scale[:, None], zp[:, None].float()
            q = (torch.clamp(torch.round(rows / scale) + zp, qmin, qmax) - zp) * scale
            err = (q - rows).abs().pow(self.p).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        return best_lo, best_hi


_OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def observer_names() -> list[str]:
    """Names accepted by :func:`build_observer` (and by recipes' ``observer`` key)."""
    return sorted(_OBSERVERS)


def build_observer(
    name: str,
    num_groups: int = 1,
    *,
    bits: int = 8,
    signed: bool = True,
    momentum: float = 0.01,
    percentile: float = 99.99,
) -> Observer:
    """Create the observer registered under ``name`` with the options that apply to it."""
    if name not in _OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; allowed: {observer_names()}")
    if name == "ema":
        return EMAObserver(num_groups, momentum=momentum)
    if name == "percentile":
        return PercentileObserver(num_groups, percentile=percentile)
    if name == "mse":
        return MSEObserver(num_groups, bits=bits, signed=signed)
    return _OBSERVERS[name](num_groups)
