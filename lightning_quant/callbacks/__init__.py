"""Lightning callbacks that quantize a LightningModule."""

from lightning_quant.callbacks.binary import Binarization
from lightning_quant.callbacks.ptq import PostTrainingQuantization
from lightning_quant.callbacks.qat import QuantizationAwareTraining

__all__ = ["Binarization", "PostTrainingQuantization", "QuantizationAwareTraining"]
