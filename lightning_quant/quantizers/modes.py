"""Quantizer modes (fake quantization, observation, calibration), set in one place.

Every quantizer carries three flags: ``fake_quant_enabled`` (quantize, or pass the float tensor on),
``observer_enabled`` (range state follows the data) and ``calibrating`` (with fake quantization off, still
observe: post-training calibration). Code outside the quantizer classes changes them only through this module:
:func:`set_modes` for a lasting change (a callback's schedule), :func:`quant_state` for a change that ends
with a block (a float reference pass, Hessians gathered in float), restoring each quantizer's own flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from lightning_quant.quantizers.base import Quantizer

Target = Union[nn.Module, Iterable[Quantizer]]


@dataclass(frozen=True)
class QuantModes:
    """One quantizer's three mode flags, as saved by :func:`quant_state` and put back on exit."""

    fake_quant: bool
    observe: bool
    calibrate: bool

    @classmethod
    def of(cls, q: Quantizer) -> QuantModes:
        return cls(q.fake_quant_enabled, q.observer_enabled, q.calibrating)

    def apply(self, q: Quantizer) -> None:
        q.fake_quant_enabled, q.observer_enabled, q.calibrating = self.fake_quant, self.observe, self.calibrate


def quantizers_of(target: Target, weights: bool = True, activations: bool = True) -> list[Quantizer]:
    """The quantizers inside a module (or the given ones), keeping weight and/or activation quantizers."""
    found = [m for m in target.modules() if isinstance(m, Quantizer)] if isinstance(target, nn.Module) else list(target)
    return [q for q in found if (weights if q.role == "weight" else activations)]


def set_modes(
    target: Target,
    *,
    fake_quant: Optional[bool] = None,
    observe: Optional[bool] = None,
    calibrate: Optional[bool] = None,
    weights: bool = True,
    activations: bool = True,
) -> list[Quantizer]:
    """Set the given flags (None: leave as is) on the selected quantizers, for good; returns those quantizers.

    ``target`` is a model (every quantizer inside it) or a list of quantizers; ``weights``/``activations``
    choose which roles change. Example: ``set_modes(model, fake_quant=True, observe=False)``.
    """
    chosen = quantizers_of(target, weights, activations)
    for q in chosen:
        if fake_quant is not None:
            q.fake_quant_enabled = fake_quant
        if observe is not None:
            q.observer_enabled = observe
        if calibrate is not None:
            q.calibrating = calibrate
    return chosen


@contextlib.contextmanager
def quant_state(
    target: Target,
    *,
    fake_quant: Optional[bool] = None,
    observe: Optional[bool] = None,
    calibrate: Optional[bool] = None,
    weights: bool = True,
    activations: bool = True,
) -> Iterator[list[Quantizer]]:
    """Set modes as :func:`set_modes` does for the ``with`` block; each quantizer's previous flags come back on
    exit, also when the block raises. Yields the quantizers it changed. Example::

        with quant_state(model, fake_quant=False):  # a float reference pass
            reference = model(x)
    """
    saved = [(q, QuantModes.of(q)) for q in quantizers_of(target, weights, activations)]
    try:
        yield set_modes(
            [q for q, _ in saved],
            fake_quant=fake_quant,
            observe=observe,
            calibrate=calibrate,
        )
    finally:
        for q, modes in saved:
            modes.apply(q)


def set_quant_state(model: nn.Module, weights: bool, activations: bool) -> None:
    """Switch fake quantization of every weight quantizer and every activation (input or output) quantizer."""
    set_modes(model, fake_quant=weights, activations=False)
    set_modes(model, fake_quant=activations, weights=False)
