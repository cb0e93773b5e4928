"""QDrop (Wei et al., ICLR 2022): BRECQ's blocks with rounding and activation steps learned jointly while
activation quantization is randomly dropped."""

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
class QDropOptions(ActivationStepOptions):
    """QDrop's keys of the ``ptq`` section: AdaRound's and the activation step's, plus the drop probability."""

    drop_prob: float = 0.5  # probability that an activation element stays in float

    def check(self) -> None:
        super().check()
        if not 0 <= self.drop_prob < 1:
            raise OptionError("drop_prob", self.drop_prob, "allowed: 0 <= drop_prob < 1")


@register_algorithm("qdrop", options=QDropOptions)
def qdrop(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """While a block trains, each element of its input and of its activation quantizers' outputs stays
    float with probability ``drop_prob`` (input: the float model's value); the target is the float block
    output. Afterwards the block's rounding is hardened and it is always quantized."""
    return reconstruct(
        model,
        batches,
        run_batch,
        cfg,
        stage="joint",
        blocks=True,
        learn_weights=True,
        learn_activations=True,
        activations_on=True,
        drop_prob=cfg.options.drop_prob,
        progress=progress,
    )
