"""Quantized layers. Each subclasses its float layer, so ``isinstance(m, nn.Conv2d)`` still holds.

Conversion swaps the class of the existing module in place and attaches quantizers, so parameters,
hooks, weight tying and modules shared between several parents all keep working, and the state dict
keeps the float model's keys (plus the quantizers' own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.nn.quantized_layer import QuantizedLayer
from lightning_quant.quantizers import Quantizer


class QuantLinear(QuantizedLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    float_class = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_call_pending():
            return self.eager_call(x)
        return self.quantized_output(F.linear(self.quantized_input(x), self.quantized_weight(), self.bias))


class _QuantConvNd(QuantizedLayer):
    folded_bn: Optional[nn.modules.batchnorm._BatchNorm] = None
    bn_frozen: bool = False
    # nn.ConvNd's
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    _conv_forward: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_call_pending():
            return self.eager_call(x)
        xq = self.quantized_input(x)
        if self.folded_bn is None:
            return self.quantized_output(self._conv_forward(xq, self.quantized_weight(), self.bias))
        return self.quantized_output(self._folded_forward(xq))

    def _fold_factor(self) -> torch.Tensor:
        """Per-output-channel ``gamma / sqrt(running_var + eps)`` of the folded BatchNorm."""
        bn = self.folded_bn
        assert bn is not None
        assert bn.running_var is not None
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        return gamma / torch.sqrt(bn.running_var + bn.eps)

    def folded_bias(self) -> torch.Tensor:
        """The bias once the folded BatchNorm's running statistics and affine are absorbed (eval / frozen BN)."""
        bn = self.folded_bn
        assert bn is not None
        assert bn.running_var is not None
        assert bn.running_mean is not None
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        return beta + (bias - bn.running_mean) * self._fold_factor()

    def weight_to_quantize(self) -> torch.Tensor:
        weight = self.weight
        if self.folded_bn is None:
            return weight
        shape = [1] * weight.dim()
        shape[0] = -1
        return weight * self._fold_factor().reshape(shape)

    def _folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv + BatchNorm with the BN scale folded into the quantized weight (Jacob et al., 2018).

        While BN is live (training, not frozen) the conv output is rescaled back and normalised with batch
        statistics, which also updates the running ones; frozen or in eval, the folded bias is the conv's bias
        (inside the convolution, as an exported graph computes it, so that the two agree to the bit).
        """
        bn = self.folded_bn
        assert bn is not None
        if not self.training or self.bn_frozen:
            return self._conv_forward(x, self.quantized_weight(), self.folded_bias())
        y = self._conv_forward(x, self.quantized_weight(), None)
        oshape = [1] * y.dim()
        oshape[1] = -1
        assert bn.running_mean is not None
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        y = y / self._fold_factor().reshape(oshape) + bias.reshape(oshape)
        # F.batch_norm treats a missing affine weight/bias as 1/0, as the BatchNorm itself would
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum or 0.1, bn.eps)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input (optionally with a folded BatchNorm)."""

    float_class = nn.Conv1d


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input (optionally with a folded BatchNorm)."""

    float_class = nn.Conv2d


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight and input (optionally with a folded BatchNorm)."""

    float_class = nn.Conv3d


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _QuantConvTransposeNd(QuantizedLayer):
    weight_axis = 1
    # nn.ConvTransposeNd's
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Union[str, tuple[int, ...]]
    dilation: tuple[int, ...]
    groups: int
    _output_padding: Callable[..., list[int]]

    def forward(self, x: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        if self.first_call_pending():
            return self.eager_call(x, output_size)
        dims = len(self.kernel_size)
        output_padding = self._output_padding(
            x,
            output_size,
            self.stride,
            self.padding,
            self.kernel_size,
            dims,
            self.dilation,
        )
        y = _CONV_TRANSPOSE[dims](
            self.quantized_input(x),
            self.quantized_weight(),
            self.bias,
            self.stride,
            self.padding,  # type: ignore[arg-type]  # a tuple: transposed convs take no padding string
            output_padding,
            self.groups,
            self.dilation,
        )
        return self.quantized_output(y)


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with fake-quantized weight and input."""

    float_class = nn.ConvTranspose1d


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with fake-quantized weight and input."""

    float_class = nn.ConvTranspose2d


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with fake-quantized weight and input."""

    float_class = nn.ConvTranspose3d


class QuantEmbedding(QuantizedLayer, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table (its integer input is never quantized)."""

    float_class = nn.Embedding
    has_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_call_pending():
            return self.eager_call(x)
        y = F.embedding(
            x,
            self.quantized_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
        return self.quantized_output(y)


class FoldedBatchNorm(nn.Module):
    """Marker class for a BatchNorm whose work moved into the preceding quantized conv: forward is identity.

    Its parameters and buffers stay where they were, so the state dict keeps the float model's keys.
    """

    float_class: ClassVar[type[nn.Module]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FoldedBatchNorm1d(FoldedBatchNorm, nn.BatchNorm1d):
    float_class = nn.BatchNorm1d


class FoldedBatchNorm2d(FoldedBatchNorm, nn.BatchNorm2d):
    float_class = nn.BatchNorm2d


class FoldedBatchNorm3d(FoldedBatchNorm, nn.BatchNorm3d):
    float_class = nn.BatchNorm3d


QUANTIZED_CLASSES: dict[type[nn.Module], type[QuantizedLayer]] = {
    cls.float_class: cls
    for cls in (
        QuantLinear,
        QuantConv1d,
        QuantConv2d,
        QuantConv3d,
        QuantConvTranspose1d,
        QuantConvTranspose2d,
        QuantConvTranspose3d,
        QuantEmbedding,
    )
}
FOLDED_BN_CLASSES: dict[type[nn.Module], type[FoldedBatchNorm]] = {
    cls.float_class: cls for cls in (FoldedBatchNorm1d, FoldedBatchNorm2d, FoldedBatchNorm3d)
}
TYPE_NAMES: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in QUANTIZED_CLASSES}


def is_transformers_conv1d(cls: type[nn.Module]) -> bool:
    """True for Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's Linear with a transposed weight).

    Checked by name so that ``transformers`` is never imported here.
    """
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def quantized_class(float_class: type[nn.Module]) -> Optional[type[QuantizedLayer]]:
    """The quantized class for a float layer class, or None. ``transformers``' Conv1D is registered on first use."""
    qcls = QUANTIZED_CLASSES.get(float_class)
    if qcls is None and is_transformers_conv1d(float_class):
        from lightning_quant.nn.transformers_layers import QuantTransformersConv1D

        qcls = QUANTIZED_CLASSES.setdefault(float_class, QuantTransformersConv1D)
    return qcls


def selection_name(qcls: type[QuantizedLayer]) -> str:
    """The ``layers.types`` entry that selects layers of this quantized class."""
    return qcls.selected_as or qcls.float_class.__name__


def is_linear(module: nn.Module) -> bool:
    """A layer computing ``x @ W.T + b`` over the last dimension: ``nn.Linear`` or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or any(is_transformers_conv1d(c) for c in type(module).__mro__)


def linear_in_features(module: nn.Module) -> int:
    """Input width of a layer for which :func:`is_linear` holds."""
    return int(module.in_features) if isinstance(module, nn.Linear) else int(cast(torch.Tensor, module.weight).shape[0])


def name_quantizers(model: nn.Module) -> None:
    """Give every quantizer of ``model`` its path (e.g. ``conv1.weight_quantizer``), which its errors name."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            module.set_qualname(".".join(p for p in name.split(".") if p != "_orig_mod"))


def swap_class(module: nn.Module, new_class: type[Any]) -> None:
    """Change ``module``'s class in place (the object, its parameters and its hooks stay the same)."""
    module.__class__ = new_class
