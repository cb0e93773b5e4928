"""Post-training algorithms (no Lightning import): calibration and reconstruction of quantized models."""

from lightning_quant.ptq import adaround, bitsplit, brecq, gptq, normtweak, qdrop  # noqa: F401  (registers them)
from lightning_quant.ptq.reconstruction import PTQConfig, Step, calibrate, finalize, reconstruct, set_quant_state
from lightning_quant.ptq.registry import ALGORITHMS, register_algorithm
from lightning_quant.ptq.units import Unit, find_units

__all__ = [
    "ALGORITHMS",
    "PTQConfig",
    "Step",
    "Unit",
    "calibrate",
    "finalize",
    "find_units",
    "reconstruct",
    "register_algorithm",
    "set_quant_state",
]
