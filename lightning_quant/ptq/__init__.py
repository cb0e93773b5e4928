"""Post-training algorithms (no Lightning import): calibration and reconstruction of quantized models.

Each algorithm module registers itself (``@register_algorithm``); ``ALGORITHMS`` finds them all by importing the
modules of this package on its first lookup, so nothing here imports a module just to register it.
"""

from lightning_quant.ptq.blocks import transformer_units
from lightning_quant.ptq.calibration_data import find_causal_lm, generate_calibration_data
from lightning_quant.ptq.progress import Progress, ProgressReport
from lightning_quant.ptq.reconstruction import (
    ActivationStepOptions,
    ReconstructionOptions,
    calibrate,
    finalize,
    reconstruct,
)
from lightning_quant.ptq.registry import ALGORITHMS, register_algorithm
from lightning_quant.ptq.settings import BlockOptions, PTQConfig
from lightning_quant.ptq.units import Unit, find_units
from lightning_quant.quantizers.modes import quant_state, set_modes, set_quant_state

__all__ = [
    "ALGORITHMS",
    "ActivationStepOptions",
    "BlockOptions",
    "PTQConfig",
    "Progress",
    "ProgressReport",
    "ReconstructionOptions",
    "Unit",
    "calibrate",
    "finalize",
    "find_causal_lm",
    "find_units",
    "generate_calibration_data",
    "quant_state",
    "reconstruct",
    "register_algorithm",
    "set_modes",
    "set_quant_state",
    "transformer_units",
]
