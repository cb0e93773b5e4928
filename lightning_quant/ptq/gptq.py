"""GPTQ (Frantar et al., ICLR 2023): one-shot weight quantization with second-order error compensation.

For a Linear layer with weight ``W`` (C_out × K) and calibration inputs ``X``, GPTQ minimises
``‖WX − ŴX‖²``. With the Hessian ``H = 2XXᵀ`` (dampened by a fraction of its mean diagonal), columns are
quantized one at a time; each column's rounding error, divided by the diagonal of the upper Cholesky
factor of ``H⁻¹``, is pushed onto the columns not yet quantized. Columns are processed in blocks of 128
(lazy batch updates). Groups get their min-max range when their first column is reached, from the
already error-updated weights; with ``act_order`` (columns by decreasing ``diag(H)``) the calibrated
per-group ranges are kept instead, so that the group layout stays contiguous.

Blocks (transformer layers) are processed in order: the Hessians of a block's layers come from inputs
produced by the already quantized blocks before it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.nn.modules import QuantizedLayer, is_linear, linear_in_features
from lightning_quant.ptq.blocks import transformer_units
from lightning_quant.ptq.capture import Call, RunBatch, _stop_hook, record_calls, run_until_stop
from lightning_quant.ptq.progress import Progress, ProgressReport
from lightning_quant.ptq.reconstruction import eval_then_quantized
from lightning_quant.ptq.registry import register_algorithm
from lightning_quant.ptq.settings import BlockOptions, PTQConfig
from lightning_quant.ptq.units import Unit
from lightning_quant.quantizers import ObserverQuantizer
from lightning_quant.quantizers.functional import qparams_from_range
from lightning_quant.quantizers.modes import quant_state
from lightning_quant.registry import OptionError


class HessianAccumulator:
    """Running ``H = 2/n · Σ xxᵀ`` over the rows fed to a Linear layer (its quantized input, if any)."""

    def __init__(self, layer: QuantizedLayer) -> None:
        features = linear_in_features(layer)
        self.hessian = torch.zeros(features, features, device=layer.weight.device)
        self.rows = 0
        self.layer = layer
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = self.layer.quantized_input(args[0].detach())
        rows = x.reshape(-1, x.shape[-1]).float()
        self.hessian.addmm_(rows.T, rows)
        self.rows += rows.shape[0]

    def result(self) -> torch.Tensor:
        self.handle.remove()
        return self.hessian * (2.0 / max(self.rows, 1))


def _grid(q: ObserverQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point (one per row of ``w``) on the quantizer's integer grid."""
    lo, hi = torch.aminmax(w, dim=1)
    return qparams_from_range(lo, hi, q.qmin, q.qmax, q.symmetric)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    q: ObserverQuantizer,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, float]:
    """Quantize ``weight`` (C, K) with GPTQ on the grid of ``q``; sets ``q``'s scales, returns (codes, error).

    ``q`` must be per-tensor, per-channel along axis 0, or per-group along the rows. The returned codes
    have the weight's shape and already include the zero point; the error is GPTQ's weighted loss
    ``Σ (w − ŵ)² / [H⁻¹]_jj`` / 2, the layer's expected output error.
    """
    rows, cols = weight.shape
    grouped = q.granularity == "per_group"
    if q.granularity == "per_channel" and q.axis != 0:
        raise ValueError("GPTQ quantizes per output channel (axis 0)")
    gs = q.group_size if grouped else cols
    if grouped and block_size % gs:
        block_size = gs * max(1, block_size // gs)
    w = weight.detach().clone().float()
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, device=w.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    per_group = cols // gs if grouped else 1
    scale = q.scale.detach().clone().float().reshape(-1)
    zero = q.zero_point.detach().clone().reshape(-1)
    if q.granularity == "per_tensor":
        scale, zero = scale.expand(rows).clone(), zero.expand(rows).clone()
    if grouped:
        scale, zero = scale.reshape(rows, per_group), zero.reshape(rows, per_group)
    codes = torch.zeros_like(w)
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if grouped and not act_order and col % gs == 0:  # a new group: its range from the updated weights
                s, z = _grid(q, w1[:, i : i + gs])
                scale[:, col // gs], zero[:, col // gs] = s, z
            s_col = scale[:, col // gs] if grouped else scale
            z_col = (zero[:, col // gs] if grouped else zero).float()
            c = torch.clamp(torch.round(w1[:, i] / s_col) + z_col, q.qmin, q.qmax)
            wq = (c - z_col) * s_col
            codes[:, i1 + i] = c
            d = hinv1[i, i]
            e = (w1[:, i] - wq) / d
            loss += float((e * e).sum()) / 2
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    if grouped:  # per-tensor and per-channel grids are used as calibrated
        q.scale.copy_(scale.reshape(-1))
        q.zero_point.copy_(zero.reshape(-1))
    return out, loss


def _supported(layer: QuantizedLayer, name: str) -> Optional[ObserverQuantizer]:
    q = layer.weight_quantizer
    if not isinstance(q, ObserverQuantizer) or not q.fake_quant_enabled:
        return None
    if not is_linear(layer) or (q.granularity == "per_channel" and q.axis != 0):
        warnings.warn(
            f"gptq: '{name}' ({type(layer).__name__}) is not a Linear layer; kept nearest rounding", stacklevel=3
        )
        return None
    return q


@dataclass
class GPTQOptions(BlockOptions):
    """GPTQ's keys of the ``ptq`` section (and ``blocks``: the module whose children are the blocks)."""

    gptq_block_size: int = 128  # columns per lazy batch update
    damp: float = 0.01  # dampening, fraction of the Hessian's mean diagonal added to it
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal

    def check(self) -> None:
        super().check()
        if not self.gptq_block_size >= 1:
            raise OptionError("gptq_block_size", self.gptq_block_size, "must be >= 1")
        if not self.damp >= 0:
            raise OptionError("damp", self.damp, "must be >= 0")


def gptq_unit(
    model: nn.Module,
    unit: Unit,
    batches: Sequence[Any],
    run_batch: RunBatch,
    cfg: PTQConfig,
    calls: Optional[list[Call]] = None,
) -> dict[str, float]:
    """GPTQ every Linear layer of ``unit`` from Hessians gathered in one pass (the unit's weights in float).

    When ``calls`` is a list, the arguments the unit's first module receives are appended to it on the way.
    """
    names = {id(m): n for n, m in model.named_modules()}
    targets = [(layer, q) for layer in unit.layers() if (q := _supported(layer, names.get(id(layer), "?"))) is not None]
    if not targets:
        return {}
    accumulators = [HessianAccumulator(layer) for layer, _ in targets]
    handles = [unit.modules[-1].register_forward_hook(_stop_hook)]
    if calls is not None:
        handles.append(record_calls(unit.modules[0], calls))
    # the block's own layers run in float while their Hessians are gathered
    with quant_state([q for _, q in targets], fake_quant=False):
        try:
            with torch.no_grad():
                run_until_stop(batches, run_batch)
        finally:
            for h in handles:
                h.remove()
            hessians = [a.result() for a in accumulators]
    errors: dict[str, float] = {}
    for (layer, q), hessian in zip(targets, hessians):
        opts: GPTQOptions = cfg.options
        weight = layer.weight_to_quantize()
        codes, err = gptq_quantize(weight, hessian, q, opts.gptq_block_size, opts.damp, opts.act_order)
        q.set_codes(codes)
        errors[names.get(id(layer), "?")] = err
    return errors


@register_algorithm("gptq", options=GPTQOptions)
def gptq(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """GPTQ block by block; returns each layer's GPTQ error as a one-point curve."""
    units = transformer_units(model, cfg)
    curves: dict[str, list[float]] = {}
    with eval_then_quantized(model):
        for index, unit in enumerate(units):
            errors = gptq_unit(model, unit, batches, run_batch, cfg)
            curves.update({k: [v] for k, v in errors.items()})
            if progress is not None:
                progress(ProgressReport("gptq", unit.name, index, len(units), 1, 1, sum(errors.values())))
    return curves
