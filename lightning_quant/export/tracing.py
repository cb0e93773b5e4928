"""Example inputs for tracing: copied to the CPU, and which of their dimensions stay dynamic."""

from __future__ import annotations

from typing import Any

import torch


def cpu_args(example_input: Any) -> tuple[Any, ...]:
    """The example input as a tuple of arguments, tensors copied to the CPU (no storage shared with the caller)."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    return tuple(a.detach().cpu().clone() if isinstance(a, torch.Tensor) else a for a in args)  # no shared storage


def dynamic_dims(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Every dimension may stay dynamic (batch, sequence, image size); export fixes those the weights pin down."""
    return tuple(
        dict.fromkeys(range(a.dim()), torch.export.Dim.AUTO) if isinstance(a, torch.Tensor) else None for a in args
    )


def batch_of_two(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Repeat a batch of one to two: ``torch.export`` fixes every dimension of size 1, and the batch must stay free."""
    return tuple(
        a.expand(2, *a.shape[1:]).clone() if isinstance(a, torch.Tensor) and a.dim() and len(a) == 1 else a
        for a in args
    )


def free_dims(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Dimensions of size 2 and more may stay dynamic (export fixes those the weights pin down); size 1 is fixed."""
    return tuple(
        {d: torch.export.Dim.AUTO for d in range(a.dim()) if a.shape[d] > 1} if isinstance(a, torch.Tensor) else None
        for a in args
    )
