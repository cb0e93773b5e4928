"""The deploy modules: what replaces each quantized layer (and block quantizer) in an exported graph.

:func:`deploy_model` copies a model and swaps every quantized Linear/Conv for a :class:`DeployLayer` (int8
weight codes, quantize/dequantize on its input and output), float layers whose weights already lie on an
integer grid (after INQ) for a :class:`GridWeightLayer`, and block input/output quantizers for a
:class:`QuantDequant`. The ONNX and ``torch.export`` formats trace that copy.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.export.cpu import int8_saturation_risk
from lightning_quant.export.errors import ExportError
from lightning_quant.export.grid import (
    BlockGrid,
    activation_grid,
    check_8bit,
    grid_codes,
    integer_grid,
    quantize_dequantize,
    weight_grid_of,
)
from lightning_quant.nn.modules import FoldedBatchNorm, QuantizedLayer, _QuantConvNd, is_linear
from lightning_quant.nn.surgery import quantized_layers
from lightning_quant.quantizers import ObserverQuantizer, Quantizer
from lightning_quant.quantizers.binary import RPReLU, TernaryQuantizer, apply_rprelu
from lightning_quant.quantizers.grid import IntegerGrid


def layer_call(layer: QuantizedLayer, name: str) -> tuple[str, Any, tuple[Any, ...]]:
    """How an exported layer computes: ``("linear", None, ())`` or ``("conv", conv function, its arguments)``.

    Raises for layers the exported forms cannot reproduce (transposed convs, non-zero padding modes).
    """
    if is_linear(layer):
        return "linear", None, ()
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise ExportError(f"'{name}': {type(layer).__name__} layers are not exportable (Linear and Conv1d/2d/3d are)")
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ExportError(f"'{name}': padding_mode={layer.padding_mode!r}/padding={layer.padding!r} not exported")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.weight.dim() - 2]
    return "conv", conv, (layer.stride, layer.padding, layer.dilation, layer.groups)


_LAYER_PARTS = ("weight_quantizer", "input_quantizer", "output_quantizer")


def check_attachments(layer: nn.Module, name: str, carried: tuple[str, ...] = ()) -> None:
    """Refuse a quantized layer holding something its exported form would drop: a forward hook or pre-hook (on
    the layer or its quantizers) or a submodule other than its quantizers. ``carried`` names the extras the
    format keeps: ``"rprelu"``, ReActNet's RPReLU child applied by its forward hook (packed format)."""
    rprelu = "rprelu" in carried and isinstance(layer._modules.get("rprelu"), RPReLU)
    for child, module in layer.named_children():
        if child not in _LAYER_PARTS and not (child == "rprelu" and rprelu):
            what = "ReActNet's RPReLU; export with format='packed'" if isinstance(module, RPReLU) else "unknown"
            raise ExportError(
                f"'{name}': submodule '{child}' ({type(module).__name__}, {what}) would be dropped by this export"
            )
    parts = [("", layer)] + [(f" on its {n}", m) for n, m in layer.named_children() if n in _LAYER_PARTS]
    for where, module in parts:
        for kind, hooks in (("forward pre-hook", module._forward_pre_hooks), ("forward hook", module._forward_hooks)):
            for hook in hooks.values():
                if rprelu and module is layer and hook is apply_rprelu:
                    continue
                raise ExportError(
                    f"'{name}': {kind}{where} ({getattr(hook, '__qualname__', repr(hook))}) would be dropped by "
                    "this export; remove it before exporting, or fold what it does into the model's modules"
                )
    if rprelu and not any(hook is apply_rprelu for hook in layer._forward_hooks.values()):
        raise ExportError(f"'{name}': has an RPReLU but not the forward hook that applies it")


def _ternary_grid(layer: QuantizedLayer, q: TernaryQuantizer) -> tuple[IntegerGrid, torch.Tensor, torch.Tensor]:
    """Codes {-1, 0, 1} of a ternary weight with its per-output-channel grid, and the scale of its negative codes."""
    with torch.no_grad():
        codes, pos, neg = q.ternary(layer.weight_to_quantize())
    zero = torch.zeros_like(pos, dtype=torch.int32)
    return IntegerGrid(pos.float(), zero, -1, 1, 0), codes.to(torch.int8), neg.float()


def deploy_weight_bias(layer: QuantizedLayer) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight exactly as the quantized model uses it (on its grid) and the bias, BatchNorm folded in."""
    with torch.no_grad():
        w = layer.quantized_weight().detach().clone()
        float_bias = cast(Optional[torch.Tensor], layer.bias)  # a Linear/Conv parameter (Embedding is not deployed)
        bias = float_bias.detach().clone() if float_bias is not None else None
        if isinstance(layer, _QuantConvNd) and layer.folded_bn is not None:
            bias = layer.folded_bias().detach().clone()
    return w, bias


class _ExportedLayer(nn.Module):
    """A Linear/Conv in exported form: it computes ``F.linear`` or its conv function on a given weight."""

    bias: Optional[nn.Parameter]

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        self.kind, self.conv_fn, self.conv_args = layer_call(layer, name)  # type: ignore[arg-type]

    def _layer(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, self.bias)
        return self.conv_fn(x, weight, self.bias, *self.conv_args)


class DeployLayer(_ExportedLayer):
    """A quantized Linear/Conv as an explicit int8 graph: quantize → dequantize on the input, int8 weight → dequantize.

    It uses torch's ``quantized_decomposed`` ops, which ``torch.onnx.export`` turns into
    QuantizeLinear/DequantizeLinear with an int8 initializer and which inductor lowers to int8 kernels.
    """

    # buffers, each registered where the weight's form needs it
    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    weight_scale_neg: Optional[torch.Tensor]
    weight_blocked_t: torch.Tensor

    def __init__(self, layer: QuantizedLayer, name: str) -> None:
        super().__init__(layer, name)
        weight, bias = deploy_weight_bias(layer)
        self.input_grid = activation_grid(layer.input_quantizer, f"{name}.input_quantizer")
        output_quantizer = cast(Optional[Quantizer], layer._modules.get("output_quantizer"))
        self.output_grid = activation_grid(output_quantizer, f"{name}.output_quantizer")
        self.weight_grid: Optional[IntegerGrid] = None
        self.blocks: Optional[BlockGrid] = None
        self.register_buffer("weight_scale_neg", None)
        wq = layer.weight_quantizer
        if isinstance(wq, TernaryQuantizer) and wq.fake_quant_enabled:
            self.weight_grid, codes, neg = _ternary_grid(layer, wq)
            self.register_buffer("weight_int8", codes)
            self.register_buffer("weight_scale", self.weight_grid.scale)
            self.register_buffer("weight_zero_point", self.weight_grid.zero_point.to(torch.int64))
            if not torch.equal(neg, self.weight_grid.scale):  # TTQ: the negative codes have their own scale
                self.register_buffer("weight_scale_neg", neg)
            self.weight = None
        elif isinstance(wq, ObserverQuantizer) and wq.fake_quant_enabled and wq.granularity == "per_group":
            if self.kind != "linear":
                raise ExportError(f"'{name}': per-group weights are exported for Linear layers only")
            self.blocks = BlockGrid.from_quantizer(wq, weight)
            self.register_buffer("weight_blocked_t", weight.t().contiguous())  # becomes int4/int8 blocks in ONNX
            self.weight = None
        elif wq is not None and wq.fake_quant_enabled:
            grid = integer_grid(wq, f"{name}.weight_quantizer")
            check_8bit(grid, f"{name}.weight_quantizer")
            if grid.dtype != torch.int8 or grid.axis not in (None, 0):
                raise ExportError(f"'{name}': weights need a signed grid per tensor or per output channel (axis 0)")
            self.weight_grid = grid
            self.register_buffer("weight_int8", grid_codes(weight, grid).to(torch.int8))
            self.register_buffer("weight_scale", grid.scale.reshape(-1).float())
            self.register_buffer("weight_zero_point", grid.zero_point.reshape(-1).to(torch.int64))
            self.weight = None
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.input_grid)

    def _weight(self) -> torch.Tensor:
        g = self.weight_grid
        if g is None:
            return self.weight  # type: ignore[return-value]
        ops = torch.ops.quantized_decomposed
        if g.axis is None:
            return ops.dequantize_per_tensor(self.weight_int8, float(g.scale), int(g.zero_point), -128, 127, torch.int8)
        zp = self.weight_zero_point
        if self.weight_scale_neg is not None:  # ternary codes with two scales: each code meets one of them
            codes = self.weight_int8
            pos = ops.dequantize_per_channel(codes.clamp(min=0), self.weight_scale, zp, 0, -128, 127, torch.int8)
            neg = ops.dequantize_per_channel(codes.clamp(max=0), self.weight_scale_neg, zp, 0, -128, 127, torch.int8)
            return pos + neg
        return ops.dequantize_per_channel(self.weight_int8, self.weight_scale, zp, 0, -128, 127, torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None:  # x @ Wᵀ with Wᵀ a constant: exported as MatMul on a blocked DequantizeLinear
            y = torch.matmul(self._input(x), self.weight_blocked_t)
            y = y + self.bias if self.bias is not None else y
        else:
            y = self._layer(self._input(x), self._weight())
        return quantize_dequantize(y, self.output_grid)


class GridWeightLayer(_ExportedLayer):
    """A float Linear/Conv whose weight already lies on an integer grid (an INQ or ternary model): the weight as
    int8 codes (int16 when they need more than 127 steps) with DequantizeLinear; activations stay float."""

    def __init__(self, layer: nn.Module, name: str, grid: IntegerGrid) -> None:
        super().__init__(layer, name)
        self.weight_grid = grid
        self.dtype = torch.int8 if grid.qmax <= 127 else torch.int16
        codes = (layer.weight.detach().float() / grid.scale).round().to(self.dtype)  # type: ignore[operator]
        self.register_buffer("weight_int8" if self.dtype == torch.int8 else "weight_int16", codes)
        bias = cast(Optional[torch.Tensor], layer.bias)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.weight_grid
        codes = self.weight_int8 if self.dtype == torch.int8 else self.weight_int16
        ops = torch.ops.quantized_decomposed
        return self._layer(x, ops.dequantize_per_tensor(codes, float(g.scale), 0, g.qmin, g.qmax, self.dtype))


def _grid_weight_layers(model: nn.Module) -> list[tuple[str, GridWeightLayer]]:
    """The float Linear/Conv layers of ``model`` whose weights lie on an integer grid, as GridWeightLayers."""
    found = []
    for name, module in model.named_modules():
        plain_conv = type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.padding_mode == "zeros"
        if not (type(module) is nn.Linear or (plain_conv and not isinstance(module.padding, str))):
            continue
        grid = weight_grid_of(module.weight)
        if grid is not None:
            found.append((name, GridWeightLayer(module, name, grid)))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (a dotted path) of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _graph_tensors(value: Any, found: dict[int, torch.Tensor], depth: int = 0) -> None:
    """Collect tensors that hold an autograd graph (non-leaf), inside plain containers up to a small depth."""
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            found[id(value)] = value
    elif depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _graph_tensors(item, found, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            _graph_tensors(item, found, depth + 1)


def _copy_for_export(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also works when the module holds tensors with an autograd graph.

    ``copy.deepcopy`` refuses non-leaf tensors, and modules keep such tensors around after training: a
    torchmetrics metric called in ``training_step`` caches its last value, a module may store its last output.
    Those become detached copies here (their graph is of no use to an exported model); parameters and
    buffers are copied as usual. Export and packing copy through this so they never depend on that state.
    """
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for value in vars(module).values():
            _graph_tensors(value, found)
    memo: dict[int, Any] = {key: tensor.detach().clone() for key, tensor in found.items()}
    return copy.deepcopy(model, memo)


def deploy_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode where every quantized layer is a :class:`DeployLayer`.

    On x86 CPUs without VNNI, int8 kernels (onnxruntime's and oneDNN's) multiply uint8 activations by int8
    weights and add the products in pairs into saturating 16-bit sums, so activations that use all 256 codes
    can overflow and ruin accuracy. A warning says so when that applies; 7-bit weights (``weights.bits=7``,
    recipe ``minmax_w7a8``, what onnxruntime calls reduce_range) keep the exported model exact there.
    """
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    deployed = _copy_for_export(model).eval()
    layers = quantized_layers(deployed)
    grid_layers = _grid_weight_layers(deployed)  # float layers trained onto a grid (INQ): weight-only integer
    if not layers and not grid_layers:
        raise ExportError(
            f"{type(model).__name__} has no quantized layer (nor a float one whose weights lie on an integer grid, "
            "as after INQ): quantize it (a callback) before export"
        )
    for name, grid_layer in grid_layers:
        replace_module(deployed, name, grid_layer)
    wide = []
    for name, layer in layers:
        check_attachments(layer, name)
        deploy = DeployLayer(layer, name)
        replace_module(deployed, name, deploy)
        grid = deploy.input_grid
        weights = deploy.weight_grid
        if grid is not None and weights is not None and grid.qmax - grid.qmin > 127 and weights.qmax > 63:
            wide.append(name)
    if wide and int8_saturation_risk():
        warnings.warn(
            f"{len(wide)} layers (first: '{wide[0]}') have 8-bit weights and activations; this CPU has no VNNI, and "
            "its int8 kernels (onnxruntime, oneDNN) sum u8*s8 products in saturating 16-bit pairs, which can wreck "
            "accuracy. For such targets quantize weights with 7 bits (weights.bits=7, recipe minmax_w7a8).",
            stacklevel=2,
        )
    for name, module in list(deployed.named_modules()):
        if isinstance(module, FoldedBatchNorm):
            replace_module(deployed, name, nn.Identity())  # its affine moved into the conv's bias
        elif isinstance(module, Quantizer):
            if module.role != "activation" or not name.endswith(("input_quantizer", "output_quantizer")):
                raise ExportError(f"'{name}': {type(module).__name__} outside a Linear/Conv layer cannot be exported")
            replace_module(
                deployed, name, QuantDequant(activation_grid(module, name))
            )  # a block's input/output quantizer
    return deployed


class QuantDequant(nn.Module):
    """A block's input or output quantizer in exported form: a QuantizeLinear/DequantizeLinear pair (or identity)."""

    def __init__(self, grid: Optional[IntegerGrid]) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.grid)
