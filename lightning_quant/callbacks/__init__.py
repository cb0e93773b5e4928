"""Lightning callbacks that quantize a LightningModule."""

from lightning_quant.callbacks.qat import QuantizationAwareTraining

__all__ = ["QuantizationAwareTraining"]
