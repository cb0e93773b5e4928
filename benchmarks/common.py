"""Shared helpers for the benchmark scripts: versions header and interleaved timing."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable

import lightning
import lightning.pytorch as pl
import torch


def header(command: str) -> str:
    """Command, date and library versions, printed above every table."""
    return (
        f"command: {command}\ndate: {datetime.date.today()}  python {platform.python_version()}"
        f"  torch {torch.__version__}  lightning {lightning.__version__}  threads {torch.get_num_threads()}"
    )


def interleaved_ratios(
    fns: dict[str, Callable[[], None]], baseline: str, rounds: int = 15, warmup: int = 3
) -> dict[str, tuple[float, float, float]]:
    """Time each function once per round, in turn (A B C A B C ...), after warm-up.

    Returns name -> (median, min, max) of the per-round ratio time(name) / time(baseline).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name in fns:
        ratios = [t / b for t, b in zip(times[name], times[baseline])]
        out[name] = (statistics.median(ratios), min(ratios), max(ratios))
    return out


def quiet_trainer(callbacks: list, epochs: int = 1) -> pl.Trainer:
    """A Trainer without logger, checkpoints, progress bar or model summary (benchmarks print their own tables)."""
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
