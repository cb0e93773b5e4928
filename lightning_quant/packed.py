"""The packed format: binary and ternary weights at 1-2 bits each, saved as a ``torch.export`` program.

Each binary-weight layer becomes a :class:`PackedBinaryLayer`: its weight is a uint8 buffer of packed codes
(sign bits, 8 per byte, one plane per sketch basis; or ternary codes, 2 bits each, 4 per byte) with scales per
output channel, which its forward unpacks with shifts and masks. The layer keeps the trained model's input
quantizer (sign, XNOR's scale, RSign's learned shift), its output quantizer and ReActNet's RPReLU, and
computes the trained weights to the bit, so the packed model's output equals the trained model's exactly.

:func:`save_packed` exports that model with ``torch.export`` (every input dimension dynamic) and saves the
program with ``torch.export.save``: a zip of JSON and raw tensor bytes, with no pickled object and no need for
the user's classes. :func:`load_packed` first checks that the archive holds nothing that torch would unpickle,
then loads it with ``torch.export.load`` and checks that its graph calls only ATen and ``operator`` functions.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_quant.deploy import (
    ExportError,
    _batch_dims,
    _cpu_args,
    _deploy_weight_bias,
    _layer_call,
    _replace,
    check_attachments,
)
from lightning_quant.nn.modules import FoldedBatchNorm, QuantizedLayer
from lightning_quant.nn.surgery import quantized_layers
from lightning_quant.quantizers import Quantizer
from lightning_quant.quantizers.binary import (
    BinaryQuantizer,
    SketchQuantizer,
    TernaryQuantizer,
    compose_bases,
    ternary_weight,
)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in ``[0, 2**bits)`` (``bits`` 1 or 2), flattened and packed into uint8, first code highest."""
    flat = codes.reshape(-1).to(torch.uint8)
    per_byte = 8 // bits
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per_byte)]).reshape(-1, per_byte)
    shifts = torch.arange(8 - bits, -1, -bits, dtype=torch.uint8)
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes stored by :func:`pack_codes` (uint8); exportable: shifts and masks only."""
    shifts = torch.arange(8 - bits, -1, -bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:count]


def _signs_and_scales(layer: QuantizedLayer, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A binary weight as ±1 bases ``(C, m, K)`` and scales ``(C, m)``: the sketch's own, or one basis ``±α_c``."""
    q = layer.weight_quantizer
    if isinstance(q, SketchQuantizer):
        with torch.no_grad():
            scales, bases = q.decompose(layer.weight_to_quantize())
        return bases, scales
    rows = weight.reshape(weight.shape[0], -1)
    alpha = rows.abs().amax(dim=1)
    if not torch.equal(rows.abs(), alpha[:, None].expand_as(rows)):
        raise ExportError(f"'{name}': {type(q).__name__} weights are not ±alpha per output channel; cannot pack them")
    return torch.where(rows > 0, 1.0, -1.0).unsqueeze(1), alpha.unsqueeze(1)


class PackedBinaryLayer(nn.Module):
    """A binary or ternary Linear/Conv whose weight is stored as packed codes and per-channel scales.

    ``forward`` unpacks the codes on every call (no maintained PyTorch library ships a packed-bit kernel), builds
    the weight with the quantizer's own formula, and applies the trained input quantizer, the layer, the output
    quantizer and ReActNet's RPReLU as the trained layer does.
    """

    def __init__(self, layer: QuantizedLayer, name: str) -> None:
        super().__init__()
        check_attachments(layer, name, carried=("rprelu",))
        weight, bias = _deploy_weight_bias(layer)
        self.kind, self.conv_fn, self.conv_args = _layer_call(layer, name)
        self.shape = tuple(weight.shape)
        q = layer.weight_quantizer
        if isinstance(q, TernaryQuantizer):
            with torch.no_grad():
                codes, pos, neg = q.ternary(layer.weight_to_quantize())
            self.ternary, self.bits, self.planes = True, 2, 1
            self.register_buffer("packed_weight", pack_codes(codes.reshape(-1).to(torch.int16) + 1, 2))
            self.register_buffer("scale_pos", pos.float().contiguous())
            self.register_buffer("scale_neg", neg.float().contiguous())
        else:
            bases, scales = _signs_and_scales(layer, weight, name)
            self.ternary, self.bits, self.planes = False, 1, bases.shape[1]
            self.register_buffer("packed_weight", pack_codes(bases > 0, 1))
            self.register_buffer("scale", scales.float().contiguous())
        self.register_buffer("bias", bias)
        self.input_quantizer = _active(layer.input_quantizer)
        self.output_quantizer = _active(layer._modules.get("output_quantizer"))
        self.rprelu = layer._modules.get("rprelu")
        if not torch.equal(self.weight(), weight):
            raise ExportError(f"'{name}': the packed weight differs from the trained one; cannot pack it exactly")

    def weight(self) -> torch.Tensor:
        """The layer's weight, rebuilt from the packed codes and scales."""
        channels = self.shape[0]
        per_channel = 1
        for d in self.shape[1:]:
            per_channel *= d
        codes = unpack_codes(self.packed_weight, self.bits, channels * per_channel * self.planes).float()
        if self.ternary:
            rows = ternary_weight(codes.reshape(channels, per_channel) - 1, self.scale_pos, self.scale_neg)
        else:
            rows = compose_bases(self.scale, (codes * 2 - 1).reshape(channels, self.planes, per_channel))
        return rows.reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer.quantize(x)
        if self.kind == "linear":
            y = torch.nn.functional.linear(x, self.weight(), self.bias)
        else:
            y = self.conv_fn(x, self.weight(), self.bias, *self.conv_args)
        if self.output_quantizer is not None:
            y = self.output_quantizer.quantize(y)
        return self.rprelu(y) if self.rprelu is not None else y


def _active(q: Optional[nn.Module]) -> Optional[Quantizer]:
    return q if isinstance(q, Quantizer) and q.fake_quant_enabled else None


def _packable(layer: QuantizedLayer) -> bool:
    q = layer.weight_quantizer
    return isinstance(q, BinaryQuantizer) and q.fake_quant_enabled


@contextmanager
def _packed_in_place(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its binary layers swapped for :class:`PackedBinaryLayer` and folded BatchNorms for
    identities, put back afterwards: no deep copy of the user's module (which may hold non-copyable state)."""
    swaps: list[tuple[str, nn.Module]] = []
    try:
        for name, layer in quantized_layers(model):
            if _packable(layer):
                packed = PackedBinaryLayer(layer, name)
                swaps.append((name, layer))
                _replace(model, name, packed)
            elif any(q.fake_quant_enabled for q in layer.modules() if isinstance(q, Quantizer)):
                raise ExportError(
                    f"'{name}': {type(layer.weight_quantizer).__name__} weights are neither binary nor ternary; the "
                    "packed format holds binary/ternary layers and float ones (export this model with format='onnx')"
                )
        if not swaps:
            raise ExportError(f"{type(model).__name__} has no binary or ternary weight layer to pack")
        for name, module in list(model.named_modules()):
            if isinstance(module, FoldedBatchNorm):  # its affine moved into the conv's bias
                swaps.append((name, module))
                _replace(model, name, nn.Identity())
        yield model
    finally:
        for name, original in reversed(swaps):
            _replace(model, name, original)


def pack_program(model: nn.Module, example_input: Any) -> Any:
    """The ``torch.export`` program of ``model`` with packed binary/ternary layers (every input dim dynamic)."""
    # a batch of 1 would be specialised (export fixes dimensions of size 1): trace with two copies of the sample
    args = tuple(
        torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1 else a
        for a in _cpu_args(example_input)
    )
    was_training = model.training
    model.eval()
    try:
        with _packed_in_place(model), torch.no_grad():
            return torch.export.export(model, args, dynamic_shapes=_batch_dims(args))
    finally:
        model.train(was_training)


def save_packed(model: nn.Module, example_input: Any, path: Union[str, Path]) -> Path:
    """Save ``model`` in the packed format: its :func:`pack_program`, written with ``torch.export.save``.

    The program keeps only what it needs to run: no per-node source traces (most of the graph file, and the
    user's file paths) and no example inputs; its JSON entries are compressed (the tensors stay stored as is).
    """
    return save_program(pack_program(model, example_input), path)


def save_program(program: Any, path: Union[str, Path]) -> Path:
    """Save a ``torch.export`` program so that :func:`check_archive` accepts it: no per-node source traces, no
    example inputs (pickled by ``torch.export.save``), JSON entries compressed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for node in program.graph.nodes:
        for key in ("stack_trace", "torch_fn", "source_fn_stack", "nn_module_stack"):
            node.meta.pop(key, None)
    program.example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            deflate = info.filename.endswith(".json")
            target.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    return path


_ENTRY = re.compile(
    r"[^/]+/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/(model_weights_config\.json|weight_\d+)|data/constants/(model_constants_config\.json|tensor_\d+)"
    r"|data/sample_inputs/model\.pt)"
)


def check_archive(path: Union[str, Path], what: str = "a packed model") -> None:
    """Refuse an archive that ``torch.export.load`` would unpickle from (pickled tensors or objects, example
    inputs), or that holds anything else than one program's graph and raw tensors (e.g. compiled libraries).
    ``what`` names the kind of file in the errors."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportError(f"{str(path)!r} is not {what} (a torch.export archive): {err}") from err
    with archive:
        names = archive.namelist()
        if len(set(names)) != len(names):
            raise ExportError(f"{str(path)!r}: repeated entry names are not allowed in {what}")
        for info in archive.infolist():
            if not _ENTRY.fullmatch(info.filename):
                raise ExportError(f"{str(path)!r}: entry {info.filename!r} is not allowed in {what}")
            if info.file_size > 64 * info.compress_size + (1 << 20):
                raise ExportError(f"{str(path)!r}: entry {info.filename!r} expands {info.file_size} bytes, not allowed")
        for name in names:
            if name.endswith("_config.json"):
                config = json.loads(archive.read(name))
                entries = config.get("config") if isinstance(config, dict) else None
                if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
                    raise ExportError(f"{str(path)!r}: {name!r} is not a tensor index, which is not allowed")
                for key, entry in entries.items():
                    if entry.get("use_pickle", True) is not False or not str(entry.get("path_name", "")).startswith(
                        ("weight_", "tensor_")
                    ):
                        raise ExportError(f"{str(path)!r}: {key!r} is a pickled object, which is not allowed")
            elif name.endswith(".pt") and archive.getinfo(name).file_size:  # save_packed leaves it empty
                raise ExportError(f"{str(path)!r}: {name!r} holds pickled objects, which are not allowed")
            elif name.endswith("models/model.json"):
                for expr in _shape_expressions(json.loads(archive.read(name))):
                    if not _is_shape_expression(expr):
                        raise ExportError(f"{str(path)!r}: shape expression {expr[:80]!r} is not allowed in {what}")


# torch.export.load evaluates each symbolic shape's ``expr_str`` with sympy.sympify, i.e. Python's eval: only
# sympy's own srepr of integer shape arithmetic is let through (these names, quoted symbol names, numbers).
_SHAPE_NAMES = frozenset(
    {
        "Symbol",
        "Integer",
        "Rational",
        "Mul",
        "Add",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "FloorDiv",
        "CeilDiv",
        "CleanDiv",
        "PythonMod",
        "IntTrueDiv",
        "FloatTrueDiv",
        "PowByNatural",
        "ModularIndexing",
        "TruncToInt",
        "RoundToInt",
        "FloorToInt",
        "CeilToInt",
        "ToFloat",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "true",
        "false",
        "True",
        "False",
        "positive",
        "integer",
        "nonnegative",
        "negative",
        "real",
        "finite",
    }
)
_QUOTED_SYMBOL = re.compile(r"'[A-Za-z]{1,8}\d{0,9}'")
_SHAPE_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def _shape_expressions(node: Any) -> Iterator[str]:
    """Every ``expr_str`` in a serialized program's JSON, at any depth."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    yield value if isinstance(value, str) else repr(value)
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _is_shape_expression(expr: str) -> bool:
    """True for sympy srepr text of shape arithmetic (``Mul(Symbol('s0', positive=True, integer=True), ...)``)."""
    if len(expr) > 10_000 or "__" in expr:
        return False
    bare = _QUOTED_SYMBOL.sub("0", expr)
    if not re.fullmatch(r"[\w\s(),=+\-*/]*", bare):
        return False
    return all(word in _SHAPE_NAMES or re.fullmatch(r"[su]\d+", word) for word in _SHAPE_IDENTIFIER.findall(bare))


def check_ops(
    program: Any, path: Union[str, Path], namespaces: tuple[str, ...] = ("aten",), what: str = "a packed model"
) -> None:
    """Refuse a loaded program whose graph calls anything but operators of ``namespaces`` and Python's ``operator``."""
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        known = isinstance(target, torch._ops.OpOverload) and target.namespace in namespaces
        if not known and getattr(target, "__module__", None) != "_operator":
            raise ExportError(f"{str(path)!r}: the graph calls {target!r}, which is not allowed in {what}")


def load_packed(path: Union[str, Path]) -> nn.Module:
    """Load a model saved by :func:`save_packed` (a runnable module); nothing is unpickled and no class of the
    original model is needed, so the file is safe to load from an untrusted source."""
    check_archive(path)
    with open(path, "rb") as f:
        program = torch.export.load(f)
    check_ops(program, path)
    return program.module()
