"""Bit-aware model summary (in the spirit of Larq's): bits, memory, MACs and bit-operations per layer."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.nn.modules import QuantizedLayer, is_linear, linear_in_features
from lightning_quant.nn.report import clean_name, format_table

_FLOAT_BITS = 32


@dataclass
class LayerCost:
    """Size and compute of one layer with weights (float or quantized)."""

    name: str
    type: str
    weight_bits: int
    activation_bits: int
    params: int
    memory_bits: int
    macs: int = 0

    @property
    def bops(self) -> int:
        """Bit-operations: MACs times weight bits times activation bits."""
        return self.macs * self.weight_bits * self.activation_bits


@dataclass
class ModelSummary:
    """Per-layer costs and totals; ``float_*`` totals treat every parameter and MAC as 32-bit."""

    layers: list[LayerCost] = field(default_factory=list)
    other_params: int = 0  # parameters outside the listed layers (BatchNorm, LayerNorm, ...), kept in float

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers) + self.other_params

    @property
    def memory_bits(self) -> int:
        return sum(r.memory_bits for r in self.layers) + self.other_params * _FLOAT_BITS

    @property
    def float_memory_bits(self) -> int:
        return self.params * _FLOAT_BITS

    @property
    def size_mb(self) -> float:
        return self.memory_bits / 8 / 1e6

    @property
    def float_size_mb(self) -> float:
        return self.float_memory_bits / 8 / 1e6

    @property
    def compression(self) -> float:
        return self.float_memory_bits / max(self.memory_bits, 1)

    @property
    def effective_bits(self) -> float:
        """Average bits per parameter."""
        return self.memory_bits / max(self.params, 1)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.layers)

    @property
    def bops(self) -> int:
        return sum(r.bops for r in self.layers)

    @property
    def float_bops(self) -> int:
        return self.macs * _FLOAT_BITS * _FLOAT_BITS

    @property
    def measured(self) -> bool:
        """Whether MACs (and so BOPs) were measured by a forward pass."""
        return self.macs > 0

    def metrics(self) -> dict[str, float]:
        """Model-level numbers for a logger (``model/bops_ratio`` only when MACs were measured)."""
        metrics = {
            "model/effective_bits": self.effective_bits,
            "model/size_mb": self.size_mb,
            "model/float_size_mb": self.float_size_mb,
            "model/compression": self.compression,
        }
        if self.measured:
            metrics["model/bops_ratio"] = self.bops / self.float_bops
        return metrics

    def table(self) -> str:
        """Plain-text table with one row per layer and a totals row against float."""
        head = ("layer", "type", "W bits", "A bits", "params", "memory (KB)", "MACs", "BOPs")
        rows = [
            (
                r.name,
                r.type,
                str(r.weight_bits),
                str(r.activation_bits),
                f"{r.params:,}",
                f"{r.memory_bits / 8e3:.2f}",
                f"{r.macs:,}",
                f"{r.bops:.3g}",
            )
            for r in self.layers
        ]
        rows.append(
            (
                "other (norms, ...)",
                "",
                "32",
                "-",
                f"{self.other_params:,}",
                f"{self.other_params * 4 / 1e3:.2f}",
                "",
                "",
            )
        )
        rows.append(
            (
                "total",
                "",
                f"{self.effective_bits:.2f}",
                "",
                f"{self.params:,}",
                f"{self.memory_bits / 8e3:.2f}",
                f"{self.macs:,}",
                f"{self.bops:.3g}",
            )
        )
        rows.append(
            (
                "float total",
                "",
                "32",
                "32",
                f"{self.params:,}",
                f"{self.float_memory_bits / 8e3:.2f}",
                f"{self.macs:,}",
                f"{self.float_bops:.3g}",
            )
        )
        text = format_table(head, rows)
        if not self.measured:
            return text + f"\ncompression {self.compression:.2f}x, MACs/BOPs not measured (no forward was run)"
        return text + f"\ncompression {self.compression:.2f}x, BOPs {self.bops / self.float_bops:.3%} of float"


def _layer_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    if not isinstance(output, torch.Tensor):
        return 0
    if is_linear(module):
        return output.numel() * linear_in_features(module)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        x = inputs[0]
        return x.numel() * module.out_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):
        return output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    return 0


def _bits(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, QuantizedLayer):
        w = module.weight_quantizer.bits if module.weight_quantizer is not None else _FLOAT_BITS
        a = module.input_quantizer.bits if module.input_quantizer is not None else _FLOAT_BITS
        return w, a
    return _FLOAT_BITS, _FLOAT_BITS


def summarize(
    model: nn.Module, example_input: Optional[Any] = None, forward: Optional[Callable[[], Any]] = None
) -> ModelSummary:
    """Summarise ``model``; with ``example_input`` (a tensor, tuple or dict) MACs are measured by one forward.

    ``forward`` (no arguments) runs the model another way instead, e.g. on a real batch the way the training
    step feeds it. The forward runs in eval mode without gradients and with fake quantization switched off, so
    no observer, quantizer or BatchNorm state changes. Batch size is taken from the example as given.
    """
    layer_types = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
    summary = ModelSummary()
    rows: dict[int, LayerCost] = {}
    counted: set[int] = set()
    for name, m in model.named_modules():
        if not (isinstance(m, layer_types) or is_linear(m)) or id(m) in rows:
            continue
        w, a = _bits(m)
        if isinstance(m, nn.Embedding):
            a = _FLOAT_BITS
        weight_n = m.weight.numel()
        bias_n = m.bias.numel() if getattr(m, "bias", None) is not None else 0
        row = LayerCost(
            clean_name(name),
            type(m).__name__.removeprefix("Quant"),
            w,
            a,
            weight_n + bias_n,
            weight_n * w + bias_n * _FLOAT_BITS,
        )
        rows[id(m)] = row
        summary.layers.append(row)
        counted.update(id(p) for p in m.parameters(recurse=False))
    summary.other_params = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    if example_input is None and forward is None:
        return summary
    modules = {id(m): m for m in model.modules() if id(m) in rows}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: setattr(rows[id(mod)], "macs", rows[id(mod)].macs + _layer_macs(mod, inp, out))
        )
        for m in modules.values()
    ]
    quantizers = [q for q in model.modules() if hasattr(q, "fake_quant_enabled")]
    saved = [(q, q.fake_quant_enabled) for q in quantizers]
    was_training = model.training
    try:
        for q in quantizers:
            setattr(q, "fake_quant_enabled", False)  # any module with the flag (typed as a Module)
        model.eval()
        with torch.no_grad():
            if forward is not None:
                forward()
            elif isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in hooks:
            h.remove()
        for q, flag in saved:
            q.fake_quant_enabled = flag
        model.train(was_training)
    return summary
