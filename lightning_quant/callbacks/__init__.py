"""Lightning callbacks that quantize a LightningModule."""

from lightning_quant.callbacks.binary import Binarization
from lightning_quant.callbacks.inq import IncrementalQuantization
from lightning_quant.callbacks.ptq import PostTrainingQuantization
from lightning_quant.callbacks.qat import QuantizationAwareTraining

__all__ = ["Binarization", "IncrementalQuantization", "PostTrainingQuantization", "QuantizationAwareTraining"]
