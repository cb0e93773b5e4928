"""Tensor-level quantizers (no Lightning import): fake quantization, learned quantizers and their registry.

Each method module registers its quantizer (``@register_quantizer``); ``QUANTIZERS`` finds them all by importing
the modules of this package on its first lookup, so nothing here imports a module just to register it.
"""

from lightning_quant.quantizers.affine import ObserverOptions, ObserverQuantizer
from lightning_quant.quantizers.base import QUANTIZERS, Quantizer, QuantizerConfig, build_quantizer, register_quantizer
from lightning_quant.quantizers.dorefa import DoReFaQuantizer
from lightning_quant.quantizers.dsq import DSQQuantizer
from lightning_quant.quantizers.dynamic import DynamicQuantizer
from lightning_quant.quantizers.functional import fake_quantize, int_range, qparams_from_range, round_ste
from lightning_quant.quantizers.lsq import LSQOptions, LSQQuantizer
from lightning_quant.quantizers.pact import PACTOptions, PACTQuantizer

__all__ = [
    "QUANTIZERS",
    "DSQQuantizer",
    "DoReFaQuantizer",
    "DynamicQuantizer",
    "LSQOptions",
    "LSQQuantizer",
    "ObserverOptions",
    "ObserverQuantizer",
    "PACTOptions",
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
