"""Name -> post-training algorithm. An algorithm reconstructs a calibrated model in place.

Signature: ``fn(model, batches, run_batch, cfg, progress) -> {unit name: loss curve}``. A new method is
one file that registers itself here, plus one recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

from torch import nn

from lightning_quant.ptq.capture import RunBatch
from lightning_quant.ptq.reconstruction import Progress, PTQConfig

Algorithm = Callable[[nn.Module, Sequence[Any], RunBatch, PTQConfig, Optional[Progress]], dict[str, list[float]]]
ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str) -> Callable[[Algorithm], Algorithm]:
    """Function decorator: make a reconstruction algorithm selectable as ``ptq.algorithm: name``."""

    def wrap(fn: Algorithm) -> Algorithm:
        ALGORITHMS[name] = fn
        return fn

    return wrap


@register_algorithm("none")
def calibration_only(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """Calibration alone: nearest rounding on the calibrated grid."""
    return {}
