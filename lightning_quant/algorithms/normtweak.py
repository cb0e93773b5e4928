"""Norm Tweaking (Li et al., AAAI 2024): GPTQ, then tune each block's normalisation layers.

Block by block, on the inputs the already quantized model produces: the block's Linear layers are
quantized with GPTQ and frozen, then only the affine parameters of its LayerNorm/RMSNorm layers are
trained with Adam so that the quantized block's per-channel output mean and variance (over tokens) match
the float block's on the same inputs: ``loss = mean_c(|μ_f − μ_q| + |σ²_f − σ²_q|)``. The learning rate
grows with depth, ``lr · (1 + slope · l / L)``; one pass over the calibration batches per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.algorithms.capture import Call, RunBatch, first_tensor
from lightning_quant.algorithms.gptq import gptq_unit, transformer_units
from lightning_quant.algorithms.reconstruction import Progress, PTQConfig, Step, eval_then_quantized
from lightning_quant.algorithms.registry import register_algorithm
from lightning_quant.algorithms.units import Unit
from lightning_quant.nn.modules import QuantizedLayer

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def norm_layers(module: nn.Module) -> list[nn.Module]:
    """Normalisation layers with affine parameters inside ``module`` (torch's and models' own RMSNorm classes)."""
    found = []
    for m in module.modules():
        is_norm = isinstance(m, _NORMS) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))
        if is_norm and any(p.requires_grad for p in m.parameters(recurse=False)):
            found.append(m)
    return found


def channel_stats_loss(quantized: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Norm Tweaking's loss: per-channel |Δmean| + |Δvariance| over all tokens, averaged over channels."""
    q = quantized.reshape(-1, quantized.shape[-1]).float()
    f = target.reshape(-1, target.shape[-1]).float()
    dm = (q.mean(0) - f.mean(0)).abs()
    dv = (q.var(0, unbiased=False) - f.var(0, unbiased=False)).abs()
    return (dm + dv).mean()


def _set_weights_quantized(unit: Unit, on: bool) -> None:
    for layer in unit.layers():
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.fake_quant_enabled = on


def tweak_block(block: nn.Module, unit: Unit, calls: list[Call], lr: float, epochs: int) -> list[float]:
    """Tune the norm parameters of ``block`` (GPTQ already applied) on the captured calls; returns the losses."""
    norms = norm_layers(block)
    params = [p for m in norms for p in m.parameters(recurse=False)]
    _set_weights_quantized(unit, False)
    with torch.no_grad():
        targets = [first_tensor(block(*args, **kwargs)).detach() for args, kwargs in calls]
    _set_weights_quantized(unit, True)
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for (args, kwargs), target in zip(calls, targets):
                    loss = channel_stats_loss(first_tensor(block(*args, **kwargs)), target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return losses


@register_algorithm("normtweak")
def normtweak(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """GPTQ then Norm Tweaking, block by block; returns each block's tweaking loss curve."""
    units = transformer_units(model, cfg)
    tweakable = [u for u in units if len(u.modules) == 1 and not isinstance(u.modules[0], QuantizedLayer)]
    tweakable = [u for u in tweakable if norm_layers(u.modules[0])]
    depth = {id(u.modules[0]): i for i, u in enumerate(tweakable)}
    curves: dict[str, list[float]] = {}
    with eval_then_quantized(model):
        for index, unit in enumerate(units):
            calls: list[Call] = []
            errors = gptq_unit(model, unit, batches, run_batch, cfg, calls)
            curves.update({f"{k} (gptq)": [v] for k, v in errors.items()})
            level = depth.get(id(unit.modules[0]))
            loss = sum(errors.values())
            if level is not None and len(calls) == len(batches):
                lr = cfg.norm_lr * (1 + cfg.norm_lr_slope * level / len(tweakable))
                curves[unit.name] = tweak_block(unit.modules[0], unit, calls, lr, cfg.norm_epochs)
                loss = curves[unit.name][-1] if curves[unit.name] else loss
            if progress is not None:
                progress(Step("normtweak", unit.name, index, len(units), 1, 1, loss))
    return curves
