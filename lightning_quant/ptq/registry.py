"""Name -> post-training algorithm. An algorithm reconstructs a calibrated model in place.

Signature: ``fn(model, batches, run_batch, ptq, progress) -> {unit name: loss curve}``; it reads its own
settings as ``ptq.options``. A new method is one file in this package that registers itself here (found on
the first lookup, see :class:`~lightning_quant.registry.Registry`), plus one recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

from torch import nn

from lightning_quant.ptq.capture import RunBatch
from lightning_quant.ptq.reconstruction import Progress
from lightning_quant.ptq.settings import PTQConfig
from lightning_quant.quantizers import QUANTIZERS
from lightning_quant.registry import Registry

Algorithm = Callable[[nn.Module, Sequence[Any], RunBatch, PTQConfig, Optional[Progress]], dict[str, list[float]]]
ALGORITHMS: Registry[Algorithm] = Registry("post-training algorithm", "lightning_quant.ptq")
QUANTIZERS.also_discover("lightning_quant.ptq")  # an algorithm may bring the quantizer its recipes name


def register_algorithm(name: str, options: Optional[type] = None) -> Callable[[Algorithm], Algorithm]:
    """Function decorator: make an algorithm selectable as ``ptq.algorithm: name``, with its options dataclass."""
    return ALGORITHMS.register(name, options)


@register_algorithm("none")
def calibration_only(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, ptq: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """Calibration alone: nearest rounding on the calibrated grid."""
    return {}
