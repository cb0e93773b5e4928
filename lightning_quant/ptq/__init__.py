"""Post-training algorithms (no Lightning import): calibration and reconstruction of quantized models.

Each algorithm module registers itself (``@register_algorithm``); ``ALGORITHMS`` finds them all by importing the
modules of this package on its first lookup, so nothing here imports a module just to register it.
"""

from lightning_quant.ptq.reconstruction import (
    ActivationStepOptions,
    ReconstructionOptions,
    Step,
    calibrate,
    finalize,
    reconstruct,
    set_quant_state,
)
from lightning_quant.ptq.registry import ALGORITHMS, register_algorithm
from lightning_quant.ptq.settings import BlockOptions, PTQConfig
from lightning_quant.ptq.units import Unit, find_units

__all__ = [
    "ALGORITHMS",
    "ActivationStepOptions",
    "BlockOptions",
    "PTQConfig",
    "ReconstructionOptions",
    "Step",
    "Unit",
    "calibrate",
    "finalize",
    "find_units",
    "reconstruct",
    "register_algorithm",
    "set_quant_state",
]
