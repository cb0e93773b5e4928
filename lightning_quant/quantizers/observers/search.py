"""The observers that search for a clip: MSE grid search (QDrop's calibration) and KL divergence on a histogram
(TensorRT's calibration)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lightning_quant.quantizers.finite import check_range
from lightning_quant.quantizers.functional import int_range, is_distributed, qparams_from_range, row_aminmax
from lightning_quant.quantizers.observers.base import MAX_HIST, MAX_SEARCH, Observer, sample_rows


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
        per_batch = max(1, MAX_SEARCH // 16)  # about 16 batches' worth of samples fill the budget
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
        kept = kept[:, :: max(1, math.ceil(kept.shape[1] / MAX_SEARCH))]
        self._kept = []
        self.deferred = False
        lo, hi = self._search(kept, self.min_val.clone(), self.max_val.clone())
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = sample_rows(rows.detach().float())
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
    histogram: torch.Tensor  # buffers
    hist_max: torch.Tensor

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
        flat = flat[:: max(1, math.ceil(flat.numel() / MAX_HIST))]  # an evenly strided sample feeds the histogram
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
