"""lightning-quant: quantization-aware training, post-training quantization and binarization as
PyTorch Lightning callbacks, driven by recipes."""

from lightning_quant.callbacks import (
    Binarization,
    IncrementalQuantization,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_quant.export import ExportError, export, load_packed, load_program
from lightning_quant.nn import dequantize_model, quantize_model, summarize
from lightning_quant.recipes import Recipe, RecipeError, list_recipes, load_recipe

__version__ = "0.1.0"

__all__ = [
    "Binarization",
    "ExportError",
    "IncrementalQuantization",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "Recipe",
    "RecipeError",
    "__version__",
    "dequantize_model",
    "export",
    "list_recipes",
    "load_packed",
    "load_program",
    "load_recipe",
    "quantize_model",
    "summarize",
]
