"""Export a quantized or binarized model for real low-bit inference: ONNX QDQ, a PyTorch int8 graph, packed bits.

* ``format="onnx"``: every quantized layer becomes ``QuantizeLinear → DequantizeLinear`` on its input
  (int8/uint8, per tensor) and an int8 weight initializer with ``DequantizeLinear`` (per tensor or per
  output channel). onnxruntime fuses these pairs into integer kernels (QLinearConv, QGemm, ...). The graph
  comes from ``torch.onnx.export`` (the ``torch.export``-based exporter), with a dynamic batch dimension.
* ``format="torch"``: the same graph as a ``torch.export`` program (torch's ``quantized_decomposed`` ops,
  the representation torchao's pt2e ``convert_pt2e`` produces); :func:`compile_int8` lowers it with inductor
  and freezing, whose x86 passes replace the patterns by oneDNN int8 convolutions and matmuls.
* ``format="packed"``: binary weights stored 8 per byte (ternary ones 4 per byte) with their scales, as a
  ``torch.export`` program that unpacks them; :func:`lightning_quant.packed.load_packed` loads it without pickle.

Ternary (TWN/TTQ) weights are exported to ONNX and ``.pt2`` as int8 codes {-1, 0, 1} with a scale per output
channel (TTQ: one for the positive and one for the negative codes). Float Linear/Conv layers whose weights already
lie on an integer grid (after INQ) are exported weight-only: int8 (or int16) codes with DequantizeLinear, float
activations. Hooks or submodules on a quantized layer that the format does not carry make the export refuse,
naming the layer.

Only grids that the target can represent are exported; anything else raises :class:`ExportError` naming
the layer. Example::

    export(model, torch.randn(1, 1, 8, 8), "model.onnx")
"""

from __future__ import annotations

import ast
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed: .pt2 files load)
import torch.nn.functional as F
from torch import nn

from lightning_quant.nn.modules import FoldedBatchNorm, QuantizedLayer, _QuantConvNd, is_linear
from lightning_quant.nn.surgery import quantized_layers
from lightning_quant.quantizers import LSQQuantizer, ObserverQuantizer, PACTQuantizer, Quantizer
from lightning_quant.quantizers.binary import BinaryQuantizer, RPReLU, TernaryQuantizer, apply_rprelu

FORMATS = ("onnx", "torch", "packed")


def int8_saturation_risk() -> bool:
    """True on x86 CPUs without VNNI (AVX2 only), whose int8 kernels add u8·s8 products in saturating 16-bit pairs."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")
    return "vnni" not in flags and "amx_int8" not in flags


class ExportError(ValueError):
    """A model (or one of its layers) that the chosen format cannot represent; the message names the layer."""


@dataclass
class AffineGrid:
    """An integer grid ``x ≈ (q − zero_point)·scale``, ``q ∈ [qmin, qmax]``; per tensor (axis None) or per channel."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: Optional[int]

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.qmin < 0 else torch.uint8

    def check_8bit(self, name: str) -> None:
        if self.qmin < -128 or self.qmax > 255 or (self.qmin < 0 and self.qmax > 127):
            raise ExportError(f"'{name}': grid [{self.qmin}, {self.qmax}] does not fit int8/uint8")


def affine_grid(q: Quantizer, name: str) -> AffineGrid:
    """The integer grid a trained/calibrated quantizer applies, if it is a uniform affine one."""
    if isinstance(q, BinaryQuantizer):
        raise ExportError(f"'{name}': {type(q).__name__} is binary; export it with format='packed' (a .packed file)")
    if q.granularity == "per_group":
        raise ExportError(f"'{name}': per-group grids (group_size={q.group_size}) are exported for Linear weights only")
    axis = None if q.granularity == "per_tensor" else q.axis
    if isinstance(q, ObserverQuantizer):
        scale, zp = q.scale.detach().float(), q.zero_point.detach().to(torch.int32)
    elif isinstance(q, LSQQuantizer):
        if q.offset is not None:
            raise ExportError(f"'{name}': LSQ+ learned a real-valued offset; QuantizeLinear needs an integer one")
        scale = q.scale_values().float()
        zp = torch.full_like(scale, int(getattr(q, "zero_point", 0)), dtype=torch.int32)  # shifted grids: codes from 0
    elif isinstance(q, PACTQuantizer):
        scale = (q.alpha.detach().abs() / q.qmax).float().reshape(-1)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        raise ExportError(
            f"'{name}': {type(q).__name__} is not a uniform affine grid with an integer zero point "
            "(export supports observer, LSQ and PACT quantizers)"
        )
    qmin = -q.qmax if isinstance(q, PACTQuantizer) and bool(q.signed) else q.qmin
    shift = int(getattr(q, "zero_point", 0)) if isinstance(q, LSQQuantizer) else 0  # LSQ's [-z, 2^b-1-z] is [0, 2^b-1]
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return AffineGrid(scale, zp, qmin + shift, q.qmax + shift, axis)


def _full_range(grid: AffineGrid) -> tuple[int, int]:
    return (-128, 127) if grid.dtype == torch.int8 else (0, 255)


def _narrow(x: torch.Tensor, grid: AffineGrid) -> torch.Tensor:
    """Clamp to a grid narrower than its 8-bit container (e.g. 4-bit activations): same codes, exportable ops."""
    if (grid.qmin, grid.qmax) == _full_range(grid) or grid.axis is not None:
        return x
    lo = (grid.qmin - float(grid.zero_point)) * float(grid.scale)
    hi = (grid.qmax - float(grid.zero_point)) * float(grid.scale)
    return torch.clamp(x, lo, hi)


def _activation_grid(q: Optional[Quantizer], name: str) -> Optional[AffineGrid]:
    """The 8-bit grid of an enabled activation quantizer, a signed one shifted to start at 0 (x86 int8 kernels
    take uint8 activations; the codes are the same), or None."""
    if q is None or not q.fake_quant_enabled:
        return None
    grid = affine_grid(q, name)
    grid.check_8bit(name)
    if grid.dtype == torch.int8:
        shift = -grid.qmin
        grid = AffineGrid(grid.scale, grid.zero_point + shift, 0, grid.qmax + shift, None)
    return grid


def _quantize_dequantize(x: torch.Tensor, grid: Optional[AffineGrid]) -> torch.Tensor:
    """``x`` on ``grid`` as a QuantizeLinear/DequantizeLinear pair (identity without a grid)."""
    if grid is None:
        return x
    ops = torch.ops.quantized_decomposed
    lo, hi = _full_range(grid)
    s, zp = float(grid.scale), int(grid.zero_point)
    q = ops.quantize_per_tensor(_narrow(x, grid), s, zp, lo, hi, grid.dtype)
    return ops.dequantize_per_tensor(q, s, zp, lo, hi, grid.dtype)


def _layer_call(layer: QuantizedLayer, name: str) -> tuple[str, Any, tuple[Any, ...]]:
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


def _ternary_grid(layer: QuantizedLayer, q: TernaryQuantizer) -> tuple[AffineGrid, torch.Tensor, torch.Tensor]:
    """Codes {-1, 0, 1} of a ternary weight with its per-output-channel grid, and the scale of its negative codes."""
    with torch.no_grad():
        codes, pos, neg = q.ternary(layer.weight_to_quantize())
    zero = torch.zeros_like(pos, dtype=torch.int32)
    return AffineGrid(pos.float(), zero, -1, 1, 0), codes.to(torch.int8), neg.float()


def _deploy_weight_bias(layer: QuantizedLayer) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight exactly as the quantized model uses it (on its grid) and the bias, BatchNorm folded in."""
    with torch.no_grad():
        w = layer.quantized_weight().detach().clone()
        bias = layer.bias.detach().clone() if layer.bias is not None else None  # type: ignore[union-attr]
        if isinstance(layer, _QuantConvNd) and layer.folded_bn is not None:
            bias = layer.folded_bias().detach().clone()
    return w, bias


class _ExportedLayer(nn.Module):
    """A Linear/Conv in exported form: it computes ``F.linear`` or its conv function on a given weight."""

    bias: Optional[nn.Parameter]

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        self.kind, self.conv_fn, self.conv_args = _layer_call(layer, name)  # type: ignore[arg-type]

    def _layer(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, self.bias)
        return self.conv_fn(x, weight, self.bias, *self.conv_args)


class DeployLayer(_ExportedLayer):
    """A quantized Linear/Conv as an explicit int8 graph: quantize → dequantize on the input, int8 weight → dequantize.

    It uses torch's ``quantized_decomposed`` ops, which ``torch.onnx.export`` turns into
    QuantizeLinear/DequantizeLinear with an int8 initializer and which inductor lowers to int8 kernels.
    """

    def __init__(self, layer: QuantizedLayer, name: str) -> None:
        super().__init__(layer, name)
        weight, bias = _deploy_weight_bias(layer)
        self.input_grid = _activation_grid(layer.input_quantizer, f"{name}.input_quantizer")
        self.output_grid = _activation_grid(layer._modules.get("output_quantizer"), f"{name}.output_quantizer")
        self.weight_grid: Optional[AffineGrid] = None
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
            grid = affine_grid(layer.weight_quantizer, f"{name}.weight_quantizer")
            grid.check_8bit(f"{name}.weight_quantizer")
            if grid.dtype != torch.int8 or grid.axis not in (None, 0):
                raise ExportError(f"'{name}': weights need a signed grid per tensor or per output channel (axis 0)")
            self.weight_grid = grid
            self.register_buffer("weight_int8", _codes(weight, grid).to(torch.int8))
            self.register_buffer("weight_scale", grid.scale.reshape(-1).float())
            self.register_buffer("weight_zero_point", grid.zero_point.reshape(-1).to(torch.int64))
            self.weight = None
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return _quantize_dequantize(x, self.input_grid)

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
        return _quantize_dequantize(y, self.output_grid)


def weight_grid_of(weight: torch.Tensor) -> Optional[AffineGrid]:
    """The per-tensor grid a float weight already lies on, or None: its smallest nonzero magnitude as the step,
    every weight an integer multiple of it, at most 32767 steps (INQ's powers of two, TWN/ELQ levels)."""
    w = weight.detach().float()
    nonzero = w.abs()[w != 0]
    if nonzero.numel() == 0:
        return None
    step = nonzero.min()
    codes = w / step
    top = float(codes.abs().max())
    if top > 32767 or not torch.equal(codes, codes.round()):
        return None
    bound = 127 if top <= 127 else 32767
    return AffineGrid(step.reshape(()), torch.zeros((), dtype=torch.int32), -bound - 1, bound, None)


class GridWeightLayer(_ExportedLayer):
    """A float Linear/Conv whose weight already lies on an integer grid (an INQ or ternary model): the weight as
    int8 codes (int16 when they need more than 127 steps) with DequantizeLinear; activations stay float."""

    def __init__(self, layer: nn.Module, name: str, grid: AffineGrid) -> None:
        super().__init__(layer, name)
        self.weight_grid = grid
        self.dtype = torch.int8 if grid.qmax <= 127 else torch.int16
        codes = (layer.weight.detach().float() / grid.scale).round().to(self.dtype)  # type: ignore[operator]
        self.register_buffer("weight_int8" if self.dtype == torch.int8 else "weight_int16", codes)
        bias = layer.bias
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


@dataclass
class BlockGrid:
    """Per-group weight grid of a Linear layer: codes (C, K), one scale and zero point per ``group`` inputs."""

    codes: torch.Tensor
    scale: torch.Tensor  # (C, K // group)
    zero_point: torch.Tensor  # (C, K // group)
    group: int
    qmin: int
    qmax: int

    @classmethod
    def from_quantizer(cls, q: ObserverQuantizer, w: torch.Tensor) -> BlockGrid:
        rows, cols = w.shape
        codes = q.integer_codes(w).reshape(rows, cols)
        groups = cols // q.group_size
        scale = q.scale.detach().float().reshape(rows, groups)
        zp = q.zero_point.detach().reshape(rows, groups).to(torch.int64)
        return cls(codes.round().to(torch.int64), scale, zp, q.group_size, q.qmin, q.qmax)

    def onnx_type(self) -> int:
        from onnx import TensorProto

        if self.qmin >= -8 and self.qmax <= 7:
            return TensorProto.INT4
        if self.qmin >= 0 and self.qmax <= 15:
            return TensorProto.UINT4
        return TensorProto.INT8 if self.qmin < 0 else TensorProto.UINT8


def _pack_nibbles(values: torch.Tensor) -> bytes:
    """4-bit values, two per byte, low nibble first (ONNX's INT4/UINT4 raw layout)."""
    flat = (values.reshape(-1).to(torch.int64) & 0xF).tolist()
    if len(flat) % 2:
        flat.append(0)
    return bytes(lo | (hi << 4) for lo, hi in zip(flat[0::2], flat[1::2]))


def _blocked_initializers(proto: Any, blocks: dict[str, BlockGrid]) -> None:
    """Replace each float ``…weight_blocked_t`` (K, C) initializer by int4/int8 blocks + DequantizeLinear (axis 0)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    for init in list(graph.initializer):
        grid = blocks.get(init.name)
        if grid is None:
            continue
        kind = grid.onnx_type()
        codes_t = grid.codes.t().contiguous()  # (K, C): blocks of `group` rows along axis 0
        zp_t = grid.zero_point.t().contiguous()
        if kind in (TensorProto.INT4, TensorProto.UINT4):
            q = helper.make_tensor(f"{init.name}_q", kind, list(codes_t.shape), _pack_nibbles(codes_t), raw=True)
            zp = helper.make_tensor(f"{init.name}_zp", kind, list(zp_t.shape), _pack_nibbles(zp_t), raw=True)
        else:
            dtype = np.int8 if kind == TensorProto.INT8 else np.uint8
            q = numpy_helper.from_array(codes_t.numpy().astype(dtype), f"{init.name}_q")
            zp = numpy_helper.from_array(zp_t.numpy().astype(dtype), f"{init.name}_zp")
        scale = numpy_helper.from_array(grid.scale.t().contiguous().numpy(), f"{init.name}_scale")
        graph.initializer.remove(init)
        graph.initializer.extend([q, scale, zp])
        node = helper.make_node(
            "DequantizeLinear", [q.name, scale.name, zp.name], [init.name], axis=0, block_size=grid.group
        )
        graph.node.insert(0, node)


def _fits_int4(grid: Optional[AffineGrid]) -> bool:
    return grid is not None and grid.qmin >= -8 and grid.qmax <= 7


def _int4_weight_initializers(proto: Any, grids: dict[str, AffineGrid]) -> None:
    """Store each ``…weight_int8`` initializer named in ``grids`` as INT4 (two codes per byte, opset 21).

    Its DequantizeLinear gets an INT4 zero point of the same values; scales and axis stay as they are.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in grids:
            continue
        name, grid = node.input[0], grids[node.input[0]]
        codes = torch.from_numpy(numpy_helper.to_array(initializers[name]).astype("int64"))
        zero_point = grid.zero_point.reshape(-1) if grid.axis is not None else grid.zero_point.reshape(())
        q = helper.make_tensor(
            f"{name.removesuffix('_int8')}_int4", TensorProto.INT4, list(codes.shape), _pack_nibbles(codes), raw=True
        )
        zp = helper.make_tensor(
            f"{name.removesuffix('_int8')}_int4_zero_point",
            TensorProto.INT4,
            list(zero_point.shape),
            _pack_nibbles(zero_point),
            raw=True,
        )
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([q, zp])
        node.input[0] = q.name
        if len(node.input) > 2:
            node.input[2] = zp.name
        else:
            node.input.append(zp.name)


# ops that commute with quantize-dequantize (Clip: its bounds are grid points, from a narrow activation grid)
_PASS_THROUGH = ("Relu", "Clip", "MaxPool", "Flatten", "Reshape")


def _graph_links(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """For an ONNX graph: the node producing each tensor, and the nodes consuming it."""
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _propagate_qdq(proto: Any) -> int:
    """Copy each activation QuantizeLinear back through Relu/Clip/MaxPool/Flatten/Reshape onto the Conv/Gemm output.

    ``Q(relu(x))`` equals ``Q(relu(DQ(Q(x))))`` for any zero point, and max-pooling and reshapes commute with
    rounding, so the model computes exactly the same; onnxruntime then sees ``DQ → Conv → Q`` and runs the
    layer as one integer kernel with an int8 output instead of dequantizing between layers. Returns how many
    pairs were added.
    """
    from onnx import helper

    graph = proto.graph
    producer, consumers = _graph_links(graph)
    added = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        tensor = q.input[0]
        node = producer.get(tensor)
        while node is not None and node.op_type in _PASS_THROUGH and len(consumers.get(node.output[0], [])) == 1:
            tensor = node.input[0]
            node = producer.get(tensor)
        if node is None or node.op_type not in ("Conv", "Gemm") or tensor == q.input[0]:
            continue
        if len(consumers.get(tensor, [])) != 1:
            continue  # the layer output is used elsewhere too (a residual): leave it float
        name = f"{tensor}_qdq{added}"
        new_q = helper.make_node("QuantizeLinear", [tensor, *q.input[1:]], [f"{name}_q"])
        new_dq = helper.make_node("DequantizeLinear", [f"{name}_q", *q.input[1:]], [f"{name}_dq"])
        for user in consumers[tensor]:
            for k, i in enumerate(user.input):
                if i == tensor:
                    user.input[k] = f"{name}_dq"
        index = list(graph.node).index(node)
        graph.node.insert(index + 1, new_q)
        graph.node.insert(index + 2, new_dq)
        added += 1
    return added


def _drop_requantization(proto: Any) -> int:
    """Remove ``DequantizeLinear → [Relu] → QuantizeLinear`` chains that give back the codes they started from.

    With the same per-tensor scale and zero point (the same initializers), ``Q(DQ(q))`` is ``q``; a Relu between
    them changes nothing when the zero point is the lowest code, as no dequantized value is negative. Such chains
    appear where a block's input quantizer follows a layer output that :func:`_propagate_qdq` put on the same
    grid, and onnxruntime keeps them as two passes over the tensor. Returns how many were removed.
    """
    from onnx import numpy_helper

    graph = proto.graph
    values = {i.name: i for i in graph.initializer}
    producer, consumers = _graph_links(graph)
    outputs = {o.name for o in graph.output}
    removed: list[Any] = []
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        source = producer.get(q.input[0])
        relu = source if source is not None and source.op_type == "Relu" else None
        dq = producer.get(relu.input[0]) if relu is not None else source
        chain = [n for n in (dq, relu) if n is not None]
        if dq is None or dq.op_type != "DequantizeLinear" or list(dq.input[1:]) != list(q.input[1:]):
            continue  # not the same grid (by initializer name)
        if len(q.input) < 3 or q.input[2] not in values or q.output[0] in outputs:
            continue
        if any(len(consumers.get(n.output[0], [])) != 1 for n in chain):
            continue  # the dequantized tensor is used elsewhere too
        zero_point = numpy_helper.to_array(values[q.input[2]])
        lowest = {"uint8": 0, "int8": -128}.get(str(zero_point.dtype))
        if zero_point.size != 1 or (relu is not None and int(zero_point) != lowest):
            continue
        for user in consumers.get(q.output[0], []):
            for k, name in enumerate(user.input):
                if name == q.output[0]:
                    user.input[k] = dq.input[0]
        removed.append([*chain, q])
    for chain in removed:
        for n in chain:
            graph.node.remove(n)
    return len(removed)


def _float_output_layers(proto: Any) -> list[str]:
    """Module names of Conv/Gemm nodes with a quantized input whose output reaches no QuantizeLinear."""
    graph = proto.graph
    producer, consumers = _graph_links(graph)
    outputs = {o.name for o in graph.output}
    names = []
    for node in graph.node:
        source = producer.get(node.input[0]) if node.input else None
        if node.op_type not in ("Conv", "Gemm", "MatMul") or source is None or source.op_type != "DequantizeLinear":
            continue
        users = consumers.get(node.output[0], [])
        if node.output[0] in outputs or (users and all(u.op_type == "QuantizeLinear" for u in users)):
            continue  # the model's own output (a classifier head) is float by design
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "[]")
        try:
            parts = [str(x) for x in ast.literal_eval(scopes)][1:-1]  # cumulative: the last is the full path
        except (ValueError, SyntaxError):
            parts = []
        names.append(parts[-1] if parts else node.name)
    return names


def _codes(w: torch.Tensor, grid: AffineGrid) -> torch.Tensor:
    shape = [1] * w.dim()
    if grid.axis is not None:
        shape[grid.axis] = -1
    s, zp = grid.scale.reshape(shape), grid.zero_point.reshape(shape)
    return torch.clamp(torch.round(w / s) + zp, grid.qmin, grid.qmax)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
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
        _replace(deployed, name, grid_layer)
    wide = []
    for name, layer in layers:
        check_attachments(layer, name)
        deploy = DeployLayer(layer, name)
        _replace(deployed, name, deploy)
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
            _replace(deployed, name, nn.Identity())  # its affine moved into the conv's bias
        elif isinstance(module, Quantizer):
            if module.role != "activation" or not name.endswith(("input_quantizer", "output_quantizer")):
                raise ExportError(f"'{name}': {type(module).__name__} outside a Linear/Conv layer cannot be exported")
            _replace(deployed, name, QuantDequant(_activation_grid(module, name)))  # a block's input/output quantizer
    return deployed


class QuantDequant(nn.Module):
    """A block's input or output quantizer in exported form: a QuantizeLinear/DequantizeLinear pair (or identity)."""

    def __init__(self, grid: Optional[AffineGrid]) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quantize_dequantize(x, self.grid)


# -- ONNX ---------------------------------------------------------------------------------------------------
def _cpu_args(example_input: Any) -> tuple[Any, ...]:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    return tuple(a.detach().cpu().clone() if isinstance(a, torch.Tensor) else a for a in args)  # no shared storage


def _batch_dims(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Every dimension may stay dynamic (batch, sequence, image size); export fixes those the weights pin down."""
    return tuple(
        dict.fromkeys(range(a.dim()), torch.export.Dim.AUTO) if isinstance(a, torch.Tensor) else None for a in args
    )


def export_onnx(
    model: nn.Module, example_input: Any, path: Union[str, Path], opset: int = 20, int4_weights: bool = False
) -> Path:
    """Write ``model`` as an ONNX QDQ graph with int8 weights; checked with ``onnx.checker``.

    Opset 20 by default: it has a ``Gelu`` operator, which onnxruntime runs as one kernel where older opsets
    spell GELU as five element-wise ops (MiniLM's feed-forward layers: 0.52x float latency instead of 0.60x).
    With ``int4_weights``, weights on a grid within ``[-8, 7]`` (4 bits and fewer) are stored as INT4 (opset 21):
    half the size of their int8 storage, the same values. onnxruntime then dequantizes them to run the layer
    in float instead of fusing it into an integer kernel, so this trades speed for size.
    """
    try:
        import onnx
    except ImportError as err:
        raise ImportError("ONNX export needs the optional extra: pip install 'lightning-quant[export]'") from err
    deployed = deploy_model(model).cpu()
    args = _cpu_args(example_input)
    path = Path(path)
    blocks = {f"{n}.weight_blocked_t": m.blocks for n, m in deployed.named_modules() if getattr(m, "blocks", None)}
    int4 = {
        f"{n}.weight_int8": m.weight_grid
        for n, m in deployed.named_modules()
        if int4_weights and isinstance(m, (DeployLayer, GridWeightLayer)) and _fits_int4(m.weight_grid)
    }
    int16 = any(isinstance(m, GridWeightLayer) and m.dtype == torch.int16 for m in deployed.modules())
    if blocks or int4 or int16:
        opset = max(opset, 21)  # block-wise DequantizeLinear, 4-bit and 16-bit types
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            deployed, args, dynamo=True, opset_version=opset, verbose=False, dynamic_shapes=_batch_dims(args)
        )
    proto = program.model_proto
    _blocked_initializers(proto, blocks)  # type: ignore[arg-type]
    _int4_weight_initializers(proto, int4)  # type: ignore[arg-type]
    _propagate_qdq(proto)
    _drop_requantization(proto)
    float_outputs = _float_output_layers(proto)
    if float_outputs:
        warnings.warn(
            f"{len(float_outputs)} quantized layers keep a float output in the ONNX graph (first: "
            f"'{float_outputs[0]}'): their output reaches an unfolded BatchNorm, a residual addition, pooling or the "
            "model output before any input quantizer, so onnxruntime cannot fuse them into integer kernels and "
            "runs them in float. Fold BatchNorm (layers.fold_bn=true) and quantize the other outputs too "
            f"(layers.quantize_outputs=[name globs]), e.g. {float_outputs[:3]}.",
            stacklevel=2,
        )
    for node in proto.graph.node:  # drop per-node debug records (source stack traces): most of a small file
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


# -- PyTorch int8 (torch.export + inductor) -------------------------------------------------------------------
def _batch_of_two(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Repeat a batch of one to two: ``torch.export`` fixes every dimension of size 1, and the batch must stay free."""
    return tuple(
        a.expand(2, *a.shape[1:]).clone() if isinstance(a, torch.Tensor) and a.dim() and len(a) == 1 else a
        for a in args
    )


def _free_dims(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Dimensions of size 2 and more may stay dynamic (export fixes those the weights pin down); size 1 is fixed."""
    return tuple(
        {d: torch.export.Dim.AUTO for d in range(a.dim()) if a.shape[d] > 1} if isinstance(a, torch.Tensor) else None
        for a in args
    )


def export_torch(model: nn.Module, example_input: Any, path: Optional[Union[str, Path]] = None) -> Any:
    """``torch.export`` program of the int8 quantize/dequantize graph (saved with ``torch.export.save`` if ``path``).

    The batch dimension stays dynamic, even for an example batch of one (traced as a batch of two). Load the
    file with :func:`load_program`.
    """
    deployed = deploy_model(model).cpu()
    blocked = [n for n, m in deployed.named_modules() if getattr(m, "blocks", None) is not None]
    if blocked:
        raise ExportError(f"'{blocked[0]}': per-group weights have no int8 kernel in PyTorch; use format='onnx'")
    args = _batch_of_two(_cpu_args(example_input))
    program = torch.export.export(deployed, args, dynamic_shapes=_free_dims(args))
    _propagate_qdq_fx(program.graph_module)
    _drop_requantization_fx(program.graph_module)
    if path is not None:
        from lightning_quant.packed import save_program

        save_program(program, path)
    return program


def load_program(path: Union[str, Path]) -> Any:
    """Load a ``.pt2`` program written by :func:`export` (or :func:`export_torch`); run it with
    ``load_program(path).module()(x)``, or compile it with :func:`compile_int8`.

    Plain ``torch.export.load`` works as well once ``lightning_quant`` (which registers torch's
    ``quantized_decomposed`` ops that the graph calls) is imported. Nothing is unpickled: a file holding pickled
    objects, or calling operators other than ATen's and the quantize/dequantize ones, is refused (``ExportError``).
    """
    from lightning_quant.packed import check_archive, check_ops

    if not Path(path).is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such .pt2 file")
    check_archive(path, "a lightning-quant program")
    with open(path, "rb") as file:
        program = torch.export.load(file)
    check_ops(program, path, ("aten", "quantized_decomposed"), "a lightning-quant program")
    return program


def _propagate_qdq_fx(graph_module: torch.fx.GraphModule) -> int:
    """The ``.pt2`` counterpart of :func:`_propagate_qdq`: copy each activation quantize/dequantize pair back
    through max-pooling, flattening, reshapes and ReLU onto the conv/linear (or its ReLU) that produces the tensor.

    Exact, as in ONNX (those ops commute with a monotone rounding). Inductor then gives the conv an int8 output
    and pools in int8, as in torchao's graphs. Returns how many pairs were added.
    """
    ops, aten = torch.ops.quantized_decomposed, torch.ops.aten
    layers = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default)
    passes = (aten.relu.default, aten.max_pool2d.default, aten.flatten.using_ints, aten.view.default,
              aten.reshape.default)  # fmt: skip
    graph = graph_module.graph
    added = 0
    for q in [n for n in graph.nodes if n.target == ops.quantize_per_tensor.default]:
        node = q.args[0]
        path = []
        while isinstance(node, torch.fx.Node) and node.target in passes and len(node.users) == 1:
            path.append(node)
            node = node.args[0]
        if not path or not isinstance(node, torch.fx.Node) or node.target not in layers or len(node.users) != 1:
            continue
        anchor = path[-1] if path[-1].target == aten.relu.default else node  # conv + ReLU is one int8 kernel
        if anchor is q.args[0]:
            continue
        with graph.inserting_after(anchor):
            copy_q = graph.call_function(ops.quantize_per_tensor.default, (anchor, *q.args[1:]))
        with graph.inserting_after(copy_q):
            copy_dq = graph.call_function(ops.dequantize_per_tensor.default, (copy_q, *q.args[1:]))
        value = anchor.meta["val"]  # a fake tensor: shapes and dtypes for torch.export's verifier
        with value.fake_mode:
            copy_q.meta["val"] = ops.quantize_per_tensor.default(value, *q.args[1:])
            copy_dq.meta["val"] = ops.dequantize_per_tensor.default(copy_q.meta["val"], *q.args[1:])
        anchor.replace_all_uses_with(copy_dq, delete_user_cb=lambda user, own=copy_q: user is not own)
        added += 1
    if added:
        graph_module.recompile()
    return added


def _drop_requantization_fx(graph_module: torch.fx.GraphModule) -> int:
    """Skip ``dequantize → quantize`` pairs with identical arguments in an exported program: they give back the
    codes they started from.

    They appear where a block's input or output quantizer meets the next layer's input quantizer on the same grid;
    inductor cannot see that the pair is the identity and spends a requantization pass over the tensor on it, and
    the pair also hides the int8 tensor from its conv + add + ReLU fusion. Returns how many were skipped.
    """
    ops = torch.ops.quantized_decomposed
    skipped = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target != ops.quantize_per_tensor.default:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.target != ops.dequantize_per_tensor.default:
            continue
        if tuple(source.args[1:]) != tuple(node.args[1:]) or source.kwargs != node.kwargs:
            continue
        node.replace_all_uses_with(source.args[0])
        skipped += 1
    if skipped:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return skipped


def compile_int8(program: Any, dynamic: Optional[bool] = False) -> Any:
    """Compile an exported int8 program with inductor and freezing, so that its x86 passes pick oneDNN int8 kernels.

    The module that ``program.module()`` returns checks the structure of its inputs in Python on every call
    (about 60 µs here, a sixth of the digits CNN's batch-1 latency); the compiled module guards its inputs
    itself, so that check is dropped. Each input shape is compiled once (``dynamic=False``): with symbolic
    shapes, inductor's x86 int8 convolution lowering fails a stride check in torch 2.13 at the second batch size.
    """
    module = program.module()
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del module._forward_pre_hooks[key]
    return _FrozenCompiled(torch.compile(module, dynamic=dynamic))


class _FrozenCompiled(nn.Module):
    """A compiled int8 program that turns inductor's freezing on only while it runs (it compiles on first call,
    once per shape). Setting it globally made every later ``torch.compile`` of a training model treat parameters
    as constants and recompile at each optimizer step."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def export(
    model: nn.Module,
    example_input: Any,
    path: Union[str, Path],
    format: Optional[str] = None,
    int4_weights: bool = False,
) -> Path:
    """Export a quantized model to ``path`` in ``format`` (``onnx``, ``torch`` or ``packed``; default: from the
    suffix .onnx/.pt2/.packed); see the module doc. ``int4_weights`` (ONNX only) stores weights of 4 bits and
    fewer as INT4 (see :func:`export_onnx`). The file appears only once it is complete."""
    format = format_for(path, format)
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is not supported; allowed: {list(FORMATS)}")
    if int4_weights and format != "onnx":
        raise ExportError(f"int4_weights applies to format='onnx' only, not {format!r}")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")  # written first, renamed when complete
    was_training = model.training
    model.eval()
    try:
        if format == "onnx":
            export_onnx(model, example_input, partial, int4_weights=int4_weights)
        elif format == "torch":
            export_torch(model, example_input, partial)
        else:
            from lightning_quant.packed import save_packed

            save_packed(model, example_input, partial)
        partial.replace(path)
    finally:
        model.train(was_training)
        partial.unlink(missing_ok=True)
    return path


def format_for(path: Union[str, Path], format: Optional[str] = None) -> str:
    """The export format: ``format`` if given, else from the file suffix (.onnx, .pt2, .packed/.pt)."""
    if format is not None:
        return format
    suffix = Path(path).suffix
    by_suffix = {".onnx": "onnx", ".pt2": "torch", ".packed": "packed", ".pt": "packed"}
    if suffix not in by_suffix:
        raise ExportError(f"cannot tell the export format of {str(path)!r}; use .onnx, .pt2 or .packed, or name it")
    return by_suffix[suffix]
