"""Quantized versions of layers that ``transformers`` defines itself; imported only when such a layer is met."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_quant.nn.quantized_layer import QuantizedLayer


class QuantTransformersConv1D(QuantizedLayer, Conv1D):
    """GPT-2's ``Conv1D`` (a Linear whose weight is stored ``(in, out)``) with fake-quantized weight and input.

    Quantizers, GPTQ and export see the weight as ``(out, in)``, like ``nn.Linear``'s, so per-channel
    and per-group grids mean the same thing for both; the stored parameter keeps its layout and its key.
    Selected by ``layers.types: [Linear]``.
    """

    float_class = Conv1D
    selected_as = "Linear"
    weight: nn.Parameter  # Conv1D's, stored (in, out)

    @property
    def in_features(self) -> int:
        return int(self.nx)

    @property
    def out_features(self) -> int:
        return int(self.nf)

    def weight_to_quantize(self) -> torch.Tensor:
        return self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_output(F.linear(self.quantized_input(x), self.quantized_weight(), self.bias))
