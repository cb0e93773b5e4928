"""Quantized layers, model surgery and the bit-aware summary (no Lightning import)."""

from lightning_quant.nn.modules import QUANTIZED_CLASSES, QuantizedLayer
from lightning_quant.nn.report import LayerSelectionError
from lightning_quant.nn.summary import ModelSummary, summarize
from lightning_quant.nn.surgery import (
    LayerOverride,
    LayerSelection,
    QuantizationReport,
    dequantize_model,
    quantize_model,
    quantized_layers,
    set_bn_frozen,
)

__all__ = [
    "QUANTIZED_CLASSES",
    "LayerOverride",
    "LayerSelection",
    "LayerSelectionError",
    "ModelSummary",
    "QuantizationReport",
    "QuantizedLayer",
    "dequantize_model",
    "quantize_model",
    "quantized_layers",
    "set_bn_frozen",
    "summarize",
]
