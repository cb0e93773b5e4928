"""Progress reports of post-training algorithms (what the callback's progress bar shows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ProgressReport:
    """Where an algorithm stands: ``stage`` ('weights', 'activations', 'joint', 'gptq', ...), unit ``index`` of
    ``total`` named ``unit``, iteration ``iteration`` of ``iterations``, and the last loss."""

    stage: str
    unit: str
    index: int
    total: int
    iteration: int
    iterations: int
    loss: float


Progress = Callable[[ProgressReport], None]
