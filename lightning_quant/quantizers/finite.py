"""Non-finite input: the error a quantizer raises, and the checks that raise it before any state changes.

A NaN or Inf reaching a quantizer would otherwise become its range or step (``scale = nan``), silently make every
later output NaN and be saved in checkpoints. Observers check the range they computed anyway (a non-finite input
gives a non-finite range), the fused kernels check inside their pass, and learned quantizers check their input
while training; each before writing anything. Under ``torch.compile`` on CPU the check is an in-graph assertion
(a ``RuntimeError``, no graph break), whose message cannot name the quantizer: reading its name would add a guard
per quantizer and recompile the layers' code for each; elsewhere it is a ``NonFiniteInputError``.

``owner`` is the quantizer (or observer) itself, whose ``qualname`` is read only when raising.
"""

from __future__ import annotations

from typing import Any

import torch


class NonFiniteInputError(ValueError):
    """A NaN or Inf reached a quantizer; its state (range, step, counters) was left as it was."""


def message(owner: Any) -> str:
    """The error text, naming the quantizer (e.g. ``conv1.input_quantizer``)."""
    name = owner if isinstance(owner, str) else owner.qualname
    return (
        f"non-finite input (NaN or Inf) reached {name}; its quantization state was left unchanged. "
        "Check the data (a NaN/Inf sample) and the training (a diverging loss) before this layer."
    )


def require(ok: torch.Tensor, owner: Any) -> None:
    """Raise unless the boolean tensor ``ok`` is true (one host sync; an in-graph assertion when compiling)."""
    if torch.compiler.is_compiling():
        if ok.device.type == "cpu":  # on an accelerator a device assertion would end the process: skipped
            torch._assert_async(ok, message("a quantizer (run without torch.compile to have it named)"))
        return
    if not bool(ok):
        raise NonFiniteInputError(message(owner))


def check_range(lo: torch.Tensor, hi: torch.Tensor, owner: Any) -> None:
    """Raise unless the range ``[lo, hi]`` (per-group vectors) is finite, width included: a NaN or Inf in the
    input makes the range non-finite, so this costs no extra pass over the tensor."""
    require(torch.isfinite(hi - lo).all(), owner)


def check_tensor(x: torch.Tensor, owner: Any) -> None:
    """Raise unless every element of ``x`` is finite (one pass; for quantizers that compute no range)."""
    require(torch.isfinite(x).all(), owner)
