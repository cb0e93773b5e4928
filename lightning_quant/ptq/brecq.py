"""BRECQ (Li et al., ICLR 2021): AdaRound over blocks, then LSQ activation steps, block by block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from lightning_quant.ptq.capture import RunBatch
from lightning_quant.ptq.reconstruction import ActivationStepOptions, Progress, reconstruct
from lightning_quant.ptq.registry import register_algorithm
from lightning_quant.ptq.settings import PTQConfig
from lightning_quant.registry import OptionError


@dataclass
class BRECQOptions(ActivationStepOptions):
    """BRECQ's keys of the ``ptq`` section: AdaRound's, plus the activation-step stage."""

    act_iters: Optional[int] = None  # activation-step stage iterations; None: iters // 4 (20k -> 5k)

    def check(self) -> None:
        super().check()
        if self.act_iters is not None and not self.act_iters >= 0:
            raise OptionError("act_iters", self.act_iters, "must be >= 0")


@register_algorithm("brecq", options=BRECQOptions)
def brecq(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """Stage 1: block-wise rounding with activations in float (``iters`` per block). Stage 2: with the
    rounding fixed, the activation steps of each block are learned (``act_iters``, default iters/4)."""
    opts: BRECQOptions = cfg.options
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
        iters=opts.act_iters if opts.act_iters is not None else max(1, opts.iters // 4),
        progress=progress,
    )
    return {**curves, **{f"{k} (activations)": v for k, v in act_curves.items()}}
