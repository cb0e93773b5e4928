"""BRECQ (Li et al., ICLR 2021): AdaRound over blocks, then LSQ activation steps, block by block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from torch import nn

from lightning_quant.ptq.capture import RunBatch
from lightning_quant.ptq.reconstruction import Progress, PTQConfig, reconstruct
from lightning_quant.ptq.registry import register_algorithm


@register_algorithm("brecq")
def brecq(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """Stage 1: block-wise rounding with activations in float (``iters`` per block). Stage 2: with the
    rounding fixed, the activation steps of each block are learned (``act_iters``, default iters/4)."""
    curves = reconstruct(
        model,
        batches,
        run_batch,
        cfg,
        stage="weights",
        blocks=True,
        learn_weights=True,
        learn_activations=False,
        activations_on=False,
        progress=progress,
    )
    act_curves = reconstruct(
        model,
        batches,
        run_batch,
        cfg,
        stage="activations",
        blocks=True,
        learn_weights=False,
        learn_activations=True,
        activations_on=True,
        iters=cfg.act_iters if cfg.act_iters is not None else max(1, cfg.iters // 4),
        progress=progress,
    )
    return {**curves, **{f"{k} (activations)": v for k, v in act_curves.items()}}
