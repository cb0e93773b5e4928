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

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_quant.export.archive import check_archive, check_ops, save_program
from lightning_quant.export.errors import ExportError
from lightning_quant.export.modules import check_attachments, deploy_weight_bias, layer_call, replace_module
from lightning_quant.export.tracing import cpu_args, dynamic_dims
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

    # buffers (ternary: scale_pos and scale_neg; binary: scale)
    packed_weight: torch.Tensor
    scale_pos: torch.Tensor
    scale_neg: torch.Tensor
    scale: torch.Tensor
    bias: Optional[torch.Tensor]

    def __init__(self, layer: QuantizedLayer, name: str) -> None:
        super().__init__()
        check_attachments(layer, name, carried=("rprelu",))
        weight, bias = deploy_weight_bias(layer)
        self.kind, self.conv_fn, self.conv_args = layer_call(layer, name)
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
                replace_module(model, name, packed)
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
                replace_module(model, name, nn.Identity())
        yield model
    finally:
        for name, original in reversed(swaps):
            replace_module(model, name, original)


def pack_program(model: nn.Module, example_input: Any) -> Any:
    """The ``torch.export`` program of ``model`` with packed binary/ternary layers (every input dim dynamic)."""
    # a batch of 1 would be specialised (export fixes dimensions of size 1): trace with two copies of the sample
    args = tuple(
        torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1 else a
        for a in cpu_args(example_input)
    )
    was_training = model.training
    model.eval()
    try:
        with _packed_in_place(model), torch.no_grad():
            return torch.export.export(model, args, dynamic_shapes=dynamic_dims(args))
    finally:
        model.train(was_training)


def save_packed(model: nn.Module, example_input: Any, path: Union[str, Path]) -> Path:
    """Save ``model`` in the packed format: its :func:`pack_program`, written with ``torch.export.save``.

    The program keeps only what it needs to run: no per-node source traces (most of the graph file, and the
    user's file paths) and no example inputs; its JSON entries are compressed (the tensors stay stored as is).
    """
    return save_program(pack_program(model, example_input), path)


def load_packed(path: Union[str, Path]) -> nn.Module:
    """Load a model saved by :func:`save_packed` (a runnable module); nothing is unpickled and no class of the
    original model is needed, so the file is safe to load from an untrusted source."""
    check_archive(path)
    with open(path, "rb") as f:
        program = torch.export.load(f)
    check_ops(program, path)
    return program.module()
