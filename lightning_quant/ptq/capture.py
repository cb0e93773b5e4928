"""Calibration data and the activations that reconstruction needs, one unit at a time.

A unit's inputs and outputs over the calibration set are captured with forward hooks while the model
runs on the calibration batches; the forward pass stops at the unit, so later layers cost nothing. Only
one unit's tensors are held at a time, in memory up to a size limit and memory-mapped from disk above it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_quant.ptq.units import Unit

RunBatch = Callable[[Any], Any]


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


class UnitSignatureError(RuntimeError):
    """A unit's module is called with something other than one tensor, so it cannot be replayed alone."""


def stored(tensor: torch.Tensor, limit_mb: float) -> torch.Tensor:
    """``tensor`` itself if it fits in ``limit_mb``, else a memory-mapped copy on disk (CPU tensors only)."""
    size_mb = tensor.numel() * tensor.element_size() / 2**20
    if size_mb <= limit_mb or tensor.device.type != "cpu":
        return tensor
    fd, path = tempfile.mkstemp(suffix=".pt", prefix="lightning_quant_cache_")
    os.close(fd)
    torch.save(tensor, path)
    mapped = torch.load(path, mmap=True, weights_only=True)
    os.unlink(path)  # the mapping keeps the data readable until it is released
    return mapped


def run_until_stop(batches: Sequence[Any], run_batch: RunBatch) -> None:
    """Run every batch through the model; a hook raising ``_Stop`` ends that batch's forward pass early."""
    for batch in batches:
        with contextlib.suppress(_Stop):
            run_batch(batch)


@torch.no_grad()
def capture(
    unit: Unit, batches: Sequence[Any], run_batch: RunBatch, outputs: bool, limit_mb: float = 1024
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``run_batch`` on every batch and return the unit's inputs (and outputs), concatenated on dim 0."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    first, last = unit.modules[0], unit.modules[-1]

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise UnitSignatureError(f"'{unit.name}' is called with {len(args)} args and kwargs {sorted(kwargs)}")
        ins.append(args[0].detach())
        if not outputs:
            raise _Stop

    def post(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise UnitSignatureError(f"'{unit.name}' returns {type(out).__name__}, not a tensor")
        outs.append(out.detach())
        raise _Stop

    handles = [first.register_forward_pre_hook(pre, with_kwargs=True)]
    if outputs:
        handles.append(last.register_forward_hook(post))
    try:
        run_until_stop(batches, run_batch)
    finally:
        for h in handles:
            h.remove()
    if len(ins) != len(batches):
        raise UnitSignatureError(f"'{unit.name}' was not reached once per batch ({len(ins)} of {len(batches)})")
    x = stored(torch.cat(ins), limit_mb)
    return x, (stored(torch.cat(outs), limit_mb) if outputs else None)


Call = tuple[tuple[Any, ...], dict[str, Any]]


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _stop_hook(*_: Any) -> None:
    raise _Stop


def record_calls(module: nn.Module, calls: list[Call]) -> Any:
    """Append the (detached) positional and keyword arguments of every call of ``module`` to ``calls``;
    returns the hook handle."""
    return module.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((_detached(args), _detached(kwargs))), with_kwargs=True
    )


@torch.no_grad()
def capture_calls(module: nn.Module, batches: Sequence[Any], run_batch: RunBatch) -> list[Call]:
    """The positional and keyword arguments ``module`` is called with, once per batch, stopping there.

    Unlike :func:`capture` this keeps any call signature (a transformer block's hidden states, attention
    mask, position embeddings), so the block can be replayed with ``module(*args, **kwargs)``.
    """
    calls: list[Call] = []
    handles = [record_calls(module, calls), module.register_forward_pre_hook(_stop_hook)]
    try:
        run_until_stop(batches, run_batch)
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(batches):
        raise UnitSignatureError(
            f"{type(module).__name__} was not reached once per batch ({len(calls)} of {len(batches)})"
        )
    return calls


def first_tensor(output: Any) -> torch.Tensor:
    """A block's main output: the tensor itself, or the first item of a tuple/list (hidden states)."""
    while isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):  # Hugging Face ModelOutput too
        output = output.to_tuple()[0] if hasattr(output, "to_tuple") else output[0]
    if not isinstance(output, torch.Tensor):
        raise UnitSignatureError(f"a block returned {type(output).__name__}, not a tensor or a tuple of tensors")
    return output
