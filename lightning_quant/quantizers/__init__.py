"""Tensor-level quantizers (no Lightning import): fake quantization, learned quantizers and their registry."""

from lightning_quant.quantizers import affine, binary, dorefa, dsq, dynamic, lsq, pact  # noqa: F401  (registers them)
from lightning_quant.quantizers.affine import ObserverQuantizer
from lightning_quant.quantizers.base import QUANTIZERS, Quantizer, QuantizerConfig, build_quantizer, register_quantizer
from lightning_quant.quantizers.dorefa import DoReFaQuantizer
from lightning_quant.quantizers.dsq import DSQQuantizer
from lightning_quant.quantizers.dynamic import DynamicQuantizer
from lightning_quant.quantizers.functional import fake_quantize, int_range, qparams_from_range, round_ste
from lightning_quant.quantizers.lsq import LSQQuantizer
from lightning_quant.quantizers.pact import PACTQuantizer

__all__ = [
    "QUANTIZERS",
    "DSQQuantizer",
    "DoReFaQuantizer",
    "DynamicQuantizer",
    "LSQQuantizer",
    "ObserverQuantizer",
    "PACTQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "build_quantizer",
    "fake_quantize",
    "int_range",
    "qparams_from_range",
    "register_quantizer",
    "round_ste",
]
