"""Bit-Split and Stitching (Wang et al., ICML 2020): weights as scaled sums of ternary bit planes.

Per output channel ``c`` the weight row is ``α_c · Σ_m 2^(m−1)·b_m`` with ``b_m ∈ {−1, 0, 1}`` and
``M = bits − 1`` planes, which covers the symmetric codes ``[−(2^M − 1), 2^M − 1]``. The planes and
``α`` are optimised alternately to reproduce the float layer's response ``Y = X_fp·Wᵀ`` from the
inputs ``X`` that the quantized network feeds the layer (its own input quantizer applied: the paper's
error compensation). With the planes fixed ``α`` has a closed form; with ``α`` fixed every plane entry
is set by exact coordinate descent over ``{−1, 0, 1}`` on ``XᵀX``. Initialisation is the calibrated
(MSE) grid, refined first on the weights alone, then on the response. The planes are then stitched
into integer codes for the layer's weight quantizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.nn.modules import QuantizedLayer, is_linear
from lightning_quant.ptq.capture import RunBatch, capture
from lightning_quant.ptq.progress import Progress, ProgressReport
from lightning_quant.ptq.reconstruction import eval_then_quantized
from lightning_quant.ptq.registry import register_algorithm
from lightning_quant.ptq.settings import PTQConfig
from lightning_quant.ptq.units import find_units
from lightning_quant.quantizers import ObserverQuantizer
from lightning_quant.quantizers.modes import quant_state, set_modes
from lightning_quant.registry import OptionError

MAX_ROWS = 15000  # sampled input rows (patches) per layer, as in the paper's code


def _rows(layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The layer's input as rows matching ``weight.reshape(C_out, -1)``: patches for Conv2d, features for Linear."""
    if is_linear(layer):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and isinstance(layer.padding, tuple):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return None


def _closed_form_alpha(q: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """Per-channel ``α`` minimising ``Σ_c ‖Y_c − α_c X q_c‖²``: ``(q_cᵀ R_c) / (q_cᵀ G q_c)``."""
    num = (q * cross).sum(dim=1)
    den = ((q @ gram) * q).sum(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.ones_like(num))


def _descend(planes: torch.Tensor, alpha: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """One sweep of exact coordinate descent over every plane entry, all channels at once.

    ``planes``: (M, C, K) ternary; ``gram``: (K, K) = XᵀX; ``cross``: (C, K) = (XᵀY)ᵀ. The objective per
    channel is ``α²·qᵀGq − 2α·qᵀR``; changing entry j by ``d`` changes it by
    ``α²(2d·(Gq)_j + d²·G_jj) − 2α·d·R_j``.
    """
    weights = 2.0 ** torch.arange(planes.shape[0], device=planes.device, dtype=planes.dtype)
    q = torch.einsum("m,mck->ck", weights, planes)
    gq = q @ gram  # (C, K), kept up to date
    candidates = torch.tensor([-1.0, 0.0, 1.0], device=planes.device, dtype=planes.dtype)
    a = alpha[:, None]
    for m in range(planes.shape[0]):
        for j in range(planes.shape[2]):
            old = planes[m, :, j]
            d = weights[m] * (candidates[None, :] - old[:, None])  # (C, 3)
            delta = a * a * (2 * d * gq[:, j : j + 1] + d * d * gram[j, j]) - 2 * a * d * cross[:, j : j + 1]
            best = delta.argmin(dim=1)
            step = d.gather(1, best[:, None]).squeeze(1)
            planes[m, :, j] = candidates[best]
            gq += step[:, None] * gram[j][None, :]
    return planes


def split(codes: torch.Tensor, num_planes: int) -> torch.Tensor:
    """Integer codes (C, K) in ``[−(2^M−1), 2^M−1]`` as M ternary planes (sign times binary digits)."""
    sign = torch.sign(codes)
    mag = codes.abs().long()
    return torch.stack([sign * ((mag >> m) & 1).to(codes.dtype) for m in range(num_planes)])


def stitch(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split`: ``Σ_m 2^(m−1)·b_m``."""
    weights = 2.0 ** torch.arange(planes.shape[0], device=planes.device, dtype=planes.dtype)
    return torch.einsum("m,mck->ck", weights, planes)


def bit_split_layer(
    weight: torch.Tensor, scale: torch.Tensor, bits: int, x: torch.Tensor, y: torch.Tensor, sweeps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``weight`` (C, K) as ``α·stitch(planes)`` to the response ``y ≈ x·Ŵᵀ``; returns (α, codes)."""
    num_planes = bits - 1
    top = 2**num_planes - 1
    w = weight.double()
    alpha = scale.double().clone()
    planes = split(torch.clamp(torch.round(w / alpha[:, None]), -top, top), num_planes)
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    xd, yd = x.double(), y.double()
    stages = [(eye, w), (xd.T @ xd, (xd.T @ yd).T)]  # weight-only refinement, then response-based
    for gram, cross in stages:
        for _ in range(sweeps):
            alpha = _closed_form_alpha(stitch(planes), gram, cross)
            planes = _descend(planes, alpha, gram, cross)
        alpha = _closed_form_alpha(stitch(planes), gram, cross)
    codes = stitch(planes)
    negative = alpha < 0
    alpha = torch.where(negative, -alpha, alpha)
    codes = torch.where(negative[:, None], -codes, codes)
    return alpha.float().clamp_min(1e-12), codes.float()


@dataclass
class BitSplitOptions:
    """Bit-Split's keys of the ``ptq`` section."""

    sweeps: int = 3  # alternating-optimisation rounds per layer

    def check(self) -> None:
        if not self.sweeps >= 1:
            raise OptionError("sweeps", self.sweeps, "must be >= 1")


@register_algorithm("bitsplit", options=BitSplitOptions)
def bitsplit(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """Bit-Split each Linear/Conv2d layer in order; other layers keep nearest rounding (with a warning)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    units = find_units(model, blocks=False)
    curves: dict[str, list[float]] = {}
    with eval_then_quantized(model):
        for index, unit in enumerate(units):
            layer = unit.modules[0]
            assert isinstance(layer, QuantizedLayer)
            q = layer.weight_quantizer
            if not isinstance(q, ObserverQuantizer) or not q.fake_quant_enabled:
                continue
            if q.granularity != "per_channel" or not q.symmetric or q.axis != 0 or q.bits < 2:
                warnings.warn(
                    f"bitsplit: '{unit.name}' needs per-channel symmetric weights of 2+ bits; kept nearest rounding",
                    stacklevel=2,
                )
                continue
            set_modes(model, fake_quant=True)
            q_in, _ = capture(unit, batches, run_batch, outputs=False, limit_mb=cfg.cache_limit_mb)
            with quant_state(model, fake_quant=False):
                fp_in, _ = capture(unit, batches, run_batch, outputs=False, limit_mb=cfg.cache_limit_mb)
            with torch.no_grad():
                xq = layer.quantized_input(q_in)
                rows_q, rows_fp = _rows(layer, xq), _rows(layer, fp_in)
                if rows_q is None or rows_fp is None:
                    warnings.warn(
                        f"bitsplit: '{unit.name}' ({type(layer).__name__}) is not supported; kept nearest rounding",
                        stacklevel=2,
                    )
                    continue
                pick = torch.randperm(rows_q.shape[0], generator=generator)[:MAX_ROWS].to(rows_q.device)
                rows_q, rows_fp = rows_q[pick], rows_fp[pick]
                w = layer.weight_to_quantize().detach()
                w2 = w.reshape(w.shape[0], -1)
                target = rows_fp @ w2.T
                alpha, codes = bit_split_layer(w2, q.scale, q.bits, rows_q, target, cfg.options.sweeps)
                before = float((target - rows_q @ (q(w).reshape_as(w2)).T).pow(2).mean())
                q.scale.copy_(alpha)
                q.zero_point.zero_()
                q.set_codes(codes.reshape(w.shape))
                after = float((target - rows_q @ (alpha[:, None] * codes).T).pow(2).mean())
            curves[unit.name] = [before, after]
            if progress is not None:
                progress(ProgressReport("bitsplit", unit.name, index, len(units), 1, 1, after))
    return curves
