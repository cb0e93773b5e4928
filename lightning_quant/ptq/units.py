"""Reconstruction units: the pieces of a model that post-training reconstruction optimises one at a time.

Units are found on the module tree, without tracing. In a ``Sequential`` a quantized layer starts a unit
that also takes the parameter-free modules after it (BatchNorm folded into it, ReLU, pooling), as
AdaRound's ``f(Wx)``. At block granularity (BRECQ, QDrop) a module that holds quantized layers and is an
element of a ``Sequential``/``ModuleList`` (a residual block in a stage, a transformer layer) is one
unit; layers outside such blocks (stem, classifier) stay units of their own. A model with no such blocks
(a plain CNN) is therefore reconstructed layer by layer at either granularity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_quant.nn.modules import QuantizedLayer
from lightning_quant.quantizers import ObserverQuantizer, Quantizer

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Unit:
    """Modules run in sequence on one tensor; the first receives the unit input, the last gives its output."""

    name: str
    modules: list[nn.Module] = field(default_factory=list)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules:
            x = m(x)
        return x

    def layers(self) -> list[QuantizedLayer]:
        """Quantized layers inside the unit, in module order."""
        found: list[QuantizedLayer] = []
        for m in self.modules:
            found += [layer for layer in m.modules() if isinstance(layer, QuantizedLayer)]
        return found

    def weight_quantizers(self) -> list[tuple[QuantizedLayer, ObserverQuantizer]]:
        """(layer, weight quantizer) pairs whose quantizer has a fixed grid (observer method)."""
        return [
            (layer, layer.weight_quantizer)
            for layer in self.layers()
            if isinstance(layer.weight_quantizer, ObserverQuantizer)
        ]

    def activation_quantizers(self) -> list[Quantizer]:
        """Input (and output) quantizers of the unit's layers."""
        return [q for layer in self.layers() for q in layer.activation_quantizers()]


def _holds_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLayer) for m in module.modules())


def find_units(model: nn.Module, blocks: bool) -> list[Unit]:
    """Split ``model`` into reconstruction units (layer-wise, or block-wise when ``blocks``), in module order."""
    units: list[Unit] = []

    def visit(module: nn.Module, prefix: str, in_container: bool) -> None:
        if isinstance(module, QuantizedLayer):
            units.append(Unit(prefix, [module]))
            return
        if blocks and in_container and not isinstance(module, _CONTAINERS):
            units.append(Unit(prefix, [module]))  # an element of a stage or layer list: a block
            return
        if isinstance(module, nn.Sequential):
            visit_sequential(module, prefix)
            return
        for name, child in module.named_children():
            if _holds_quantized(child):
                visit(child, f"{prefix}.{name}" if prefix else name, isinstance(module, _CONTAINERS))

    def visit_sequential(seq: nn.Sequential, prefix: str) -> None:
        current: Unit | None = None
        for name, child in seq.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, QuantizedLayer) or (
                blocks and _holds_quantized(child) and not isinstance(child, _CONTAINERS)
            ):
                current = Unit(full, [child])
                units.append(current)
            elif _holds_quantized(child):
                current = None  # a nested container: its own units
                visit(child, full, True)
            elif current is not None:
                current.modules.append(child)  # BN, activation, pooling after the layer

    visit(model, "", False)
    return units
