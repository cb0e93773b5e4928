"""Quantization diagnostics shared by the callbacks: per-layer SQNR, scales, clipping, and plots.

The numbers go to whatever loggers the Trainer has; figures go to loggers that take images (W&B,
TensorBoard). Only rank zero writes.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.hooks import RemovableHandle
from torchmetrics.functional.audio import signal_noise_ratio

from lightning_quant.nn import quantized_layers
from lightning_quant.quantizers import Quantizer


def sqnr_db(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchmetrics' SNR over the flattened tensor)."""
    x = original.detach().float().flatten()
    y = quantized.detach().float().flatten()
    if torch.equal(x, y):
        return float("inf")
    return float(signal_noise_ratio(y, x))


COLLAPSE_DB = 1.0  # a multi-bit quantizer below this SQNR (or non-finite) has collapsed: the layer passes ~no signal
_warned_collapse: weakref.WeakSet[Quantizer] = weakref.WeakSet()  # each collapsed quantizer is reported once


def warn_if_collapsed(name: str, kind: str, quantizer: Quantizer, sqnr: float) -> None:
    """Warn (rank zero, once per quantizer) when a quantizer of 2 bits or more reproduces its tensor with
    less than ``COLLAPSE_DB`` dB SQNR or a non-finite one (exact reproduction, +inf, is fine); 1-bit codes are
    expected to be low."""
    if quantizer.bits < 2 or quantizer in _warned_collapse or sqnr == math.inf or sqnr >= COLLAPSE_DB:
        return
    _warned_collapse.add(quantizer)
    rank_zero_warn(
        f"lightning-quant: layer '{name}': {kind} SQNR is {sqnr:.2f} dB at {quantizer.bits} bits, so the "
        f"quantizer has collapsed (step {float(quantizer.scale_values().float().mean()):.3g}); the layer passes "
        "almost no signal. Lower the learning rate of the quantizer's step, or check its input."
    )


def clipped_fraction(quantizer: Quantizer, x: torch.Tensor) -> float:
    """Fraction of the elements of ``x`` that fall outside the quantizer's representable range."""
    lo, hi = quantizer.clip_range()
    rows = quantizer.rows(x.detach().float())
    lo = lo.to(rows.device).reshape(-1, 1) if lo.numel() == rows.shape[0] else lo.to(rows.device).reshape(-1)[0]
    hi = hi.to(rows.device).reshape(-1, 1) if hi.numel() == rows.shape[0] else hi.to(rows.device).reshape(-1)[0]
    return float(((rows < lo) | (rows > hi)).float().mean())


def weight_metrics(model: torch.nn.Module) -> dict[str, float]:
    """Per-layer weight SQNR (dB), mean step size and clipped fraction, computed from the weights alone."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, layer in quantized_layers(model):
            q = layer.weight_quantizer
            if q is None or not q.fake_quant_enabled or not bool(q.initialized):
                continue
            w = layer.weight_to_quantize().detach()
            wq = q.quantize(w)
            out[f"quant/{name}/weight_sqnr_db"] = sqnr_db(w, wq)
            warn_if_collapsed(name, "weight", q, out[f"quant/{name}/weight_sqnr_db"])
            out[f"quant/{name}/weight_scale"] = float(q.scale_values().float().mean())
            out[f"quant/{name}/weight_clipped"] = clipped_fraction(q, w)
    return out


class ActivationRecorder:
    """Forward hooks on input quantizers that record SQNR, scale and clipped fraction for one batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.metrics: dict[str, float] = {}
        self._handles: list[RemovableHandle] = []
        for name, layer in quantized_layers(model):
            if layer.input_quantizer is not None:
                self._handles.append(layer.input_quantizer.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def record(q: Quantizer, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not q.fake_quant_enabled or f"quant/{name}/act_sqnr_db" in self.metrics:
                return
            x = inputs[0]
            self.metrics[f"quant/{name}/act_sqnr_db"] = sqnr_db(x, output)
            warn_if_collapsed(name, "activation", q, self.metrics[f"quant/{name}/act_sqnr_db"])
            self.metrics[f"quant/{name}/act_scale"] = float(q.scale_values().float().mean())
            self.metrics[f"quant/{name}/act_clipped"] = clipped_fraction(q, x)

        return record

    def remove(self) -> dict[str, float]:
        """Detach the hooks and return what was recorded."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return self.metrics


@rank_zero_only
def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: Optional[int] = None) -> None:
    """Send ``metrics`` to every logger of the Trainer (rank zero only)."""
    finite = {k: v for k, v in metrics.items() if v == v and abs(v) != float("inf")}
    for logger in trainer.loggers:
        logger.log_metrics(finite, step=trainer.global_step if step is None else step)


@rank_zero_only
def log_plots(trainer: pl.Trainer, metrics: dict[str, float], model: torch.nn.Module) -> None:
    """Per-layer SQNR bar chart (and weight histograms on TensorBoard) for loggers that show images."""
    image_loggers = [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]
    if not image_loggers:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig = sqnr_figure(trainer.global_step, metrics, model, plt)
    if fig is None:
        return
    for lg in image_loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key="quant/sqnr_per_layer", images=[fig], step=trainer.global_step)
        else:
            lg.experiment.add_figure("quant/sqnr_per_layer", fig, global_step=trainer.global_step)
            for name, layer in quantized_layers(model):
                lg.experiment.add_histogram(f"weights/{name}", layer.weight.detach().float().cpu(), trainer.global_step)
    plt.close(fig)


def sqnr_figure(step: int, metrics: dict[str, float], model: torch.nn.Module, plt: Any) -> Any:
    """Bar chart of weight and activation SQNR per layer, in model order (``named_modules``); None if none."""
    logged = {k.split("/")[1] for k in metrics if k.startswith("quant/") and k.endswith("_sqnr_db")}
    names = [name for name, _ in quantized_layers(model) if name in logged]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.2))
    xs = range(len(names))
    for offset, kind in ((-0.2, "weight"), (0.2, "act")):
        vals = [metrics.get(f"quant/{n}/{kind}_sqnr_db", 0.0) for n in names]
        vals = [v if abs(v) != float("inf") else 0.0 for v in vals]
        ax.bar([x + offset for x in xs], vals, width=0.4, label=f"{kind} SQNR")
    ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("dB")
    ax.set_title(f"Quantization SQNR per layer (step {step})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
