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
from typing import ClassVar

import torch
import torch.distributed as dist

from lightning_quant.quantizers.finite import check_range
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
# The histogram (KL) observer bins at most this many elements of each tensor; the range uses all of them.
_MAX_HIST = 1 << 16
# Elements a deferred MSE search runs over (kept from all calibration batches).
_MAX_SEARCH = 1 << 16


def _sample(rows: torch.Tensor) -> torch.Tensor:
    step = max(1, math.ceil(rows.shape[1] / _MAX_SAMPLE))
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
        rows = _sample(rows.detach().float())
        q = self.percentile / 100.0
        hi = torch.quantile(rows, q, dim=1)
        lo = torch.quantile(rows, 1.0 - q, dim=1)
        return lo, hi


class MSEObserver(Observer):
    """Shrinks the min-max range to the clip that minimises the L_p quantization error (grid search).

    As in QDrop's calibration: ``candidates`` evenly spaced clip ratios in ``(0, 1]`` with ``p = 2.4``.
    The search uses the bit width, sign and symmetry of the quantizer that owns the observer, so the error it
    minimises is that of the grid the quantizer will use.
    """

    plain_range = False

    def __init__(
        self,
        num_groups: int = 1,
        bits: int = 8,
        signed: bool = True,
        p: float = 2.4,
        candidates: int = 100,
        symmetric: bool = False,
    ) -> None:
        super().__init__(num_groups)
        self.bits, self.signed, self.p, self.candidates = bits, signed, p, candidates
        self.symmetric = symmetric
        self.deferred = False  # calibration: keep a sample of every batch, search once in finalize()
        self._kept: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, rows: torch.Tensor) -> None:
        if not self.deferred:
            super().forward(rows)
            return
        rows = rows.detach().float()
        lo, hi = row_aminmax(rows)
        check_range(lo, hi, self)
        per_batch = max(1, _MAX_SEARCH // 16)  # about 16 batches' worth of samples fill the budget
        step = max(1, math.ceil(rows.shape[1] / per_batch))
        self._kept.append(rows[:, ::step])
        if self.has_range:
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)
        else:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        self._counted()

    @torch.no_grad()
    def sync(self) -> None:
        """Deferred mode: global min/max (each rank then searches within it); otherwise averaged estimates."""
        if not self.deferred:
            super().sync()
        elif is_distributed():
            dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN)
            dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX)

    @torch.no_grad()
    def finalize(self) -> None:
        """Deferred mode: one search over the kept samples of all batches, within the overall min/max."""
        if not self._kept:
            return
        kept = torch.cat(self._kept, dim=1)
        kept = kept[:, :: max(1, math.ceil(kept.shape[1] / _MAX_SEARCH))]
        self._kept = []
        self.deferred = False
        lo, hi = self._search(kept, self.min_val.clone(), self.max_val.clone())
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _sample(rows.detach().float())
        lo0, hi0 = row_aminmax(rows)
        return self._search(rows, lo0, hi0)

    def _search(self, rows: torch.Tensor, lo0: torch.Tensor, hi0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink ``[lo0, hi0]`` by each candidate ratio and keep the one of least L_p error on ``rows``."""
        qmin, qmax = int_range(self.bits, self.signed and bool((lo0 < 0).any()))
        best_err = torch.full_like(lo0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for i in range(1, self.candidates + 1):
            ratio = i / self.candidates
            lo, hi = lo0 * ratio, hi0 * ratio
            scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric=self.symmetric)
            scale, zp = scale[:, None], zp[:, None].float()
            q = (torch.clamp(torch.round(rows / scale) + zp, qmin, qmax) - zp) * scale
            err = (q - rows).abs().pow(self.p).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        return best_lo, best_hi


class HistogramObserver(Observer):
    """Entropy (KL) calibration, TensorRT style: a histogram of ``|x|`` and the clip that keeps it most similar.

    ``forward`` only accumulates a ``bins``-bin histogram of absolute values (re-binned when the range
    grows), which costs about one extra pass over each tensor. ``finalize`` then tries each clip threshold
    ``i`` (from ``2^(bits-1)`` bins up), folds the clipped tail into the last kept bin, quantizes the kept
    histogram to the code's levels, and keeps the threshold of least KL divergence. Per tensor only.

    KL compares the clipped distribution with its quantized version, so it does not see the cost of the
    clipping itself: on saturated data (a spike at the largest magnitude, such as image backgrounds) it
    clips far too much. ``clipped_fraction`` records how much was cut; the PTQ callback warns above 1%.
    """

    plain_range = False

    def __init__(self, num_groups: int = 1, bits: int = 8, signed: bool = True, bins: int = 2048) -> None:
        super().__init__(num_groups)
        if num_groups != 1:
            raise ValueError("the KL (histogram) observer is per tensor only")
        self.bits, self.signed, self.bins = bits, signed, bins
        self.register_buffer("histogram", torch.zeros(bins))
        self.register_buffer("hist_max", torch.zeros(()))
        self.clipped_fraction = 0.0  # share of observed values beyond the chosen threshold

    @torch.no_grad()
    def forward(self, rows: torch.Tensor) -> None:
        flat = rows.detach().float().reshape(-1)
        lo, hi = torch.aminmax(flat)
        check_range(lo, hi, self)
        flat = flat[:: max(1, math.ceil(flat.numel() / _MAX_HIST))]  # an evenly strided sample feeds the histogram
        bound = torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8)
        if self.has_range:
            self.min_val.clamp_(max=lo)
            self.max_val.clamp_(min=hi)
        else:
            self.min_val.fill_(lo)
            self.max_val.fill_(hi)
        if bool(bound > self.hist_max):
            self._rebin(float(bound))
        top = float(self.hist_max)
        idx = (flat.abs() * (self.bins / top)).long().clamp_(max=self.bins - 1)
        self.histogram += torch.bincount(idx, minlength=self.bins).to(self.histogram.dtype)
        self._counted()

    def _rebin(self, new_max: float) -> None:
        """Spread the counts of the old histogram over a wider range ``[0, new_max]``."""
        old_max = float(self.hist_max)
        if old_max > 0 and bool(self.histogram.sum() > 0):
            centers = (torch.arange(self.bins, device=self.histogram.device) + 0.5) * (old_max / self.bins)
            idx = (centers / new_max * self.bins).long().clamp_(max=self.bins - 1)
            moved = torch.zeros_like(self.histogram).index_add_(0, idx, self.histogram)
            self.histogram.copy_(moved)
        self.hist_max.fill_(new_max)

    @torch.no_grad()
    def finalize(self) -> None:
        if not self.has_range or float(self.histogram.sum()) == 0:
            return
        hist = self.histogram.clone()
        if hist.numel() > 1:
            hist[0] = hist[1]  # ignore the spike of exact zeros (ReLU outputs, padding), as TensorRT does
        levels = 2 ** (self.bits - 1) if (self.signed and float(self.min_val) < 0) else 2**self.bits
        levels = min(levels, self.bins)
        best_i = self._best_threshold_bin(hist, levels)
        threshold = best_i * float(self.hist_max) / self.bins
        self.clipped_fraction = float(self.histogram[best_i:].sum() / self.histogram.sum())
        self.max_val.clamp_(max=threshold)
        self.min_val.clamp_(min=-threshold)

    def _best_threshold_bin(self, hist: torch.Tensor, levels: int) -> int:
        """Number of kept bins of least KL divergence: about 256 evenly spaced candidates, then every bin
        around the best of them (TensorRT tries every bin; this finds the same minimum unless two basins lie
        within one coarse step)."""
        step = max(1, (self.bins - levels) // 256)
        coarse = torch.arange(levels, self.bins + 1, step, device=hist.device)
        best = int(coarse[int(kl_divergences(hist, levels, coarse).argmin())])
        fine = torch.arange(max(levels, best - step + 1), min(self.bins, best + step - 1) + 1, device=hist.device)
        return int(fine[int(kl_divergences(hist, levels, fine).argmin())])

    @torch.no_grad()
    def sync(self) -> None:
        """Sum histograms over DDP ranks (same range first), global min/max."""
        if not is_distributed():
            return
        top = self.hist_max.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        if bool(top > self.hist_max):
            self._rebin(float(top))
        dist.all_reduce(self.histogram, op=dist.ReduceOp.SUM)
        dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX)


def kl_divergences(hist: torch.Tensor, levels: int, kept_bins: torch.Tensor) -> torch.Tensor:
    """TensorRT's calibration criterion for each candidate threshold, from prefix sums of the histogram.

    For ``i`` kept bins, ``P`` is the histogram cut at bin ``i`` with the cut-off mass added to bin ``i - 1``;
    ``Q`` quantizes the cut histogram to ``levels`` buckets of consecutive bins, spreading each bucket's
    mass evenly over its non-empty bins. Returns ``KL(P || Q)`` per candidate (a zero ``Q`` bin where ``P``
    has mass counts as ``1e-12``). Bucket masses and ``Σ p log p`` come from cumulative sums, so a
    candidate costs O(levels), not O(bins), and every bin can be a candidate.
    """
    h = hist.double()
    zero = h.new_zeros(1)
    mass_upto = torch.cat([zero, torch.cumsum(h, 0)])  # mass_upto[k] = Σ_{j<k} h_j
    filled_upto = torch.cat([zero, torch.cumsum((h > 0).double(), 0)])
    hlogh = torch.where(h > 0, h * torch.log(h.clamp_min(1e-300)), 0.0)
    hlogh_upto = torch.cat([zero, torch.cumsum(hlogh, 0)])
    total = mass_upto[-1]
    i = kept_bins.long()
    tail = total - mass_upto[i]
    last = h[i - 1]
    ref_last = last + tail  # the last kept bin of P, cut-off mass folded in
    # Σ_j p_j log p_j, with p = ref / total
    ref_log_ref = hlogh_upto[i - 1] + torch.where(ref_last > 0, ref_last * torch.log(ref_last.clamp_min(1e-300)), 0.0)
    plogp = ref_log_ref / total - torch.log(total)
    # buckets: bins [ceil(b·i/levels), ceil((b+1)·i/levels)) for b < levels
    b = torch.arange(levels + 1, device=hist.device)
    edges = torch.div(b[None, :] * i[:, None] + levels - 1, levels, rounding_mode="floor")  # (candidates, levels+1)
    mass = torch.take(mass_upto, edges).diff(dim=1)
    support = torch.take(filled_upto, edges).diff(dim=1)
    log_avg = torch.where(support > 0, torch.log(mass.clamp_min(1e-300) / support.clamp_min(1)), 0.0)
    kept_mass = mass_upto[i]  # Σ Q before normalising
    # Σ_j p_j log q_j over bins where Q > 0 (every non-empty bin), then the last bin's folded tail
    plogq = (mass * log_avg).sum(dim=1) + torch.where(last > 0, tail * log_avg[:, -1], 0.0)
    covered = total - torch.where(last > 0, 0.0, ref_last)  # P's mass where Q > 0
    plogq = (plogq - covered * torch.log(kept_mass.clamp_min(1e-300))) / total
    empty_last = (last == 0) & (ref_last > 0)  # P has mass where Q has none
    plogq = plogq + torch.where(empty_last, ref_last / total * math.log(1e-12), 0.0)
    return (plogp - plogq).float()


_OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": HistogramObserver,
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
    symmetric: bool = False,
) -> Observer:
    """Create the observer registered under ``name`` with the options that apply to it."""
    if name not in _OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; allowed: {observer_names()}")
    if name == "ema":
        return EMAObserver(num_groups, momentum=momentum)
    if name == "percentile":
        return PercentileObserver(num_groups, percentile=percentile)
    if name == "mse":
        return MSEObserver(num_groups, bits=bits, signed=signed, symmetric=symmetric)
    if name == "kl":
        return HistogramObserver(num_groups, bits=bits, signed=signed)
    return _OBSERVERS[name](num_groups)
