"""ONNX export: the deployed model traced by ``torch.onnx.export``, then rewritten for onnxruntime.

The rewrites store per-group and 4-bit weights as INT4/INT8 blocks, copy activation QuantizeLinear nodes back
onto the Conv/Gemm that produces the tensor (so onnxruntime fuses integer kernels), and drop requantizations
that give back the codes they started from. Each rewrite leaves the computed values exactly as they were.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_quant.export.grid import BlockGrid
from lightning_quant.export.modules import DeployLayer, GridWeightLayer, deploy_model
from lightning_quant.export.tracing import cpu_args, dynamic_dims
from lightning_quant.quantizers.grid import IntegerGrid


def _onnx_type(grid: BlockGrid) -> int:
    """The smallest ONNX integer type that holds the block codes (INT4/UINT4, else INT8/UINT8)."""
    from onnx import TensorProto

    if grid.qmin >= -8 and grid.qmax <= 7:
        return TensorProto.INT4
    if grid.qmin >= 0 and grid.qmax <= 15:
        return TensorProto.UINT4
    return TensorProto.INT8 if grid.qmin < 0 else TensorProto.UINT8


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
        kind = _onnx_type(grid)
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


def _fits_int4(grid: Optional[IntegerGrid]) -> bool:
    return grid is not None and grid.qmin >= -8 and grid.qmax <= 7


def _int4_weight_initializers(proto: Any, grids: dict[str, IntegerGrid]) -> None:
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
    args = cpu_args(example_input)
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
            deployed, args, dynamo=True, opset_version=opset, verbose=False, dynamic_shapes=dynamic_dims(args)
        )
    assert program is not None  # dynamo=True always returns an ONNXProgram (None is the legacy exporter's)
    proto = program.model_proto
    _blocked_initializers(proto, blocks)
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
