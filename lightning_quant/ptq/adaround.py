"""AdaRound (Nagel et al., ICML 2020): learned rounding, one layer at a time, activation grids fixed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from torch import nn

from lightning_quant.ptq.capture import RunBatch
from lightning_quant.ptq.reconstruction import Progress, ReconstructionOptions, reconstruct
from lightning_quant.ptq.registry import register_algorithm
from lightning_quant.ptq.settings import PTQConfig


@register_algorithm("adaround", options=ReconstructionOptions)
def adaround(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """Each layer (with the activation after it) learns its rounding to match the float layer's output,
    taking its input from the already-quantized layers before it; activations keep their calibrated steps."""
    return reconstruct(
        model,
        batches,
        run_batch,
        cfg,
        stage="weights",
        blocks=False,
        learn_weights=True,
        learn_activations=False,
        activations_on=True,
        progress=progress,
    )
