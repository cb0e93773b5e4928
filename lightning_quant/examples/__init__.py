"""The embedded default for the main job and the benchmarks: scikit-learn digits, small CNNs."""

from lightning_quant.examples.digits import DigitsCNN, DigitsDataModule, ImageClassifier
from lightning_quant.examples.resnet import resnet20

__all__ = ["DigitsCNN", "DigitsDataModule", "ImageClassifier", "resnet20"]
