"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights before static W8A8.

A few input channels of a transformer's Linear layers carry activations far larger than the rest, so one
per-tensor activation step wastes most codes on them. SmoothQuant divides each input channel ``j`` by
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` and multiplies the matching weight column by it:
``(X diag(s)^-1)(diag(s) W)`` is the same product, with flatter activations and slightly harder weights.

Where the division goes: the paper folds it into the LayerNorm before the layer, which is exact only when that
LayerNorm feeds nothing else. In a post-LN model (BERT, MiniLM) the LayerNorm output is also the residual, so
here the division happens inside the layer's input quantizer and the multiplication inside its weight quantizer,
both :class:`SmoothQuantizer` (recipe ``weights.method: smoothquant`` and ``activations.method: smoothquant``).
Each quantizer gives back a tensor on its input's scale (``Q(x/s)·s`` and ``Q(W·s)/s``), so the layer's product
is ``Q(x/s)·Q(W·s)ᵀ``, what an int8 runtime computes from the smoothed codes, and the float parameters stay
untouched. The algorithm writes the same factors into both quantizers of a layer; both state dicts carry them,
so a model rebuilt from the recipe loads a checkpoint as it is. Each layer gets its own factors (Q, K and V too,
where the paper shares one set through the LayerNorm). Integer export is refused (the per-channel ``s`` is not
a grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import nn

from lightning_quant.nn.modules import QuantizedLayer, is_linear
from lightning_quant.ptq.capture import RunBatch
from lightning_quant.ptq.normtweak import norm_layers
from lightning_quant.ptq.progress import Progress, ProgressReport
from lightning_quant.ptq.reconstruction import calibrate, eval_then_quantized, finalize
from lightning_quant.ptq.registry import register_algorithm
from lightning_quant.ptq.settings import PTQConfig
from lightning_quant.quantizers import ObserverOptions, ObserverQuantizer, QuantizerConfig, register_quantizer
from lightning_quant.quantizers.base import Role
from lightning_quant.quantizers.grid import ExportGrid, NoIntegerGrid
from lightning_quant.quantizers.modes import quant_state
from lightning_quant.registry import OptionError

SCOPES = ("norm_inputs", "all")


@dataclass
class SmoothQuantOptions:
    """SmoothQuant's settings (``ptq`` recipe keys when ``algorithm: smoothquant``)."""

    alpha: float = 0.5  # migration strength: 0 leaves activations as they are, 1 moves all their range into weights
    scope: str = "norm_inputs"  # norm_inputs: layers fed by a LayerNorm/RMSNorm output (the paper's), or all

    def check(self) -> None:
        """Refuse values the algorithm cannot use."""
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionError("alpha", self.alpha, "allowed: 0 <= alpha <= 1")
        if self.scope not in SCOPES:
            raise OptionError("scope", self.scope, f"allowed: {', '.join(SCOPES)}")


class SmoothQuantExportError(ValueError):
    """A smoothed weight asked for integer codes: its per-input-channel factors have no export form yet."""


_NO_EXPORT = (
    "SmoothQuant rescales each input channel by its own factor s (the input divided, the weight multiplied), "
    "which integer export cannot express yet; export this layer from another recipe"
)


@register_quantizer("smoothquant", options=ObserverOptions)
class SmoothQuantizer(ObserverQuantizer):
    """The observer method on a tensor rescaled along its last (input-channel) dimension, scaled back after.

    ``smoothing_factors`` holds ``s``: an activation gives ``Q(x/s)·s``, a weight ``(out, in)`` gives
    ``Q(W·s)/s``. Empty (the default, before SmoothQuant ran) it is the observer method itself; a state dict
    sizes the buffer on load. Example::

        q = SmoothQuantizer(QuantizerConfig(method="smoothquant", bits=8), "activation")
        q.smoothing_factors = s  # then re-calibrate the range on x/s
    """

    smoothing_factors: torch.Tensor

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.register_buffer("smoothing_factors", torch.ones(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.smoothing_factors
        if not s.numel():
            return super().forward(x)
        if not (self.fake_quant_enabled or self.calibrating):
            return x
        if x.shape[-1] != s.numel():
            raise ValueError(
                f"'{self.qualname}': SmoothQuant factors for {s.numel()} input channels, tensor {tuple(x.shape)}"
            )
        s = s.to(x.dtype)
        activation = self.role == "activation"
        out = super().forward(x / s if activation else x * s)  # observes the smoothed tensor while calibrating
        if not self.fake_quant_enabled:
            return x
        return out * s if activation else out / s

    @torch.no_grad()
    def reset_range(self) -> None:
        """Forget the observed range (a fresh observer of the same kind), to calibrate again after smoothing."""
        observer = type(self)(self.cfg, self.role, self.num_groups).observer
        observer.qualname = self.qualname
        self.observer = observer.to(self.scale.device)

    def integer_codes(self, w: torch.Tensor) -> torch.Tensor:
        if self.smoothing_factors.numel():
            raise SmoothQuantExportError(f"'{self.qualname}': {_NO_EXPORT}")
        return super().integer_codes(w)

    def export_grid(self) -> ExportGrid:
        """None once smoothed (the per-channel ``s`` is not a grid); before SmoothQuant ran, the observer's grid."""
        if self.smoothing_factors.numel():
            return NoIntegerGrid(f"SmoothQuantizer: {_NO_EXPORT}")
        return super().export_grid()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "smoothing_factors")
        if saved is not None and saved.shape != self.smoothing_factors.shape:
            self.smoothing_factors = torch.zeros_like(saved)  # size the buffer to the saved factors before loading
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        n = self.smoothing_factors.numel()
        return super().extra_repr() + (f", smoothed over {n} input channels" if n else "")


def smoothable_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """Quantized layers whose input and weight quantizers are both :class:`SmoothQuantizer` (Linear layers only).

    A layer with only one of the two is refused by name: the same factors must divide the input and multiply the
    weight. Layers with neither are not smoothed.
    """
    found: list[tuple[str, QuantizedLayer]] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLayer):
            continue
        quantizers = {"input": layer.input_quantizer, "weight": layer.weight_quantizer}
        smooth = {role: isinstance(q, SmoothQuantizer) for role, q in quantizers.items()}
        if not any(smooth.values()):
            continue
        if not all(smooth.values()):
            other = next(role for role, ok in smooth.items() if not ok)
            raise ValueError(
                f"ptq.algorithm=smoothquant: layer '{name}' has a {type(quantizers[other]).__name__} {other} "
                "quantizer; SmoothQuant divides the input and multiplies the weight by the same factors: set both "
                "weights.method and activations.method: smoothquant (as recipes/smoothquant_w8a8.yaml does)"
            )
        if not is_linear(layer):
            raise ValueError(
                f"ptq.algorithm=smoothquant: layer '{name}' ({type(layer).__name__}) is not a Linear layer"
            )
        found.append((name, layer))
    if not found:
        raise ValueError(
            f"ptq.algorithm=smoothquant: {type(model).__name__} has no quantized layer whose weights and inputs use "
            "method smoothquant: set weights.method and activations.method: smoothquant"
        )
    return found


@torch.no_grad()
def input_statistics(
    model: nn.Module, layers: Sequence[QuantizedLayer], batches: Sequence[Any], run_batch: RunBatch
) -> tuple[list[torch.Tensor], list[bool]]:
    """Per layer, in the float model: ``max |X_j|`` over the calibration batches per input channel, and whether its
    input was always the output of a LayerNorm/RMSNorm (the layers the paper smooths)."""
    peaks: list[Optional[torch.Tensor]] = [None] * len(layers)
    norm_fed = [True] * len(layers)
    norm_outputs: list[torch.Tensor] = []  # held until the batch ends, so no other tensor reuses their memory

    def keep(_: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, torch.Tensor):
            norm_outputs.append(out)

    def record(i: int) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            prev = peaks[i]
            peaks[i] = m if prev is None else torch.maximum(prev, m)
            same = (o.data_ptr() == x.data_ptr() and o.shape == x.shape for o in norm_outputs)
            norm_fed[i] = norm_fed[i] and any(same)

        return hook

    handles = [norm.register_forward_hook(keep) for norm in norm_layers(model)]
    handles += [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        with quant_state(model, fake_quant=False, calibrate=False):
            for batch in batches:
                run_batch(batch)
                norm_outputs.clear()
    finally:
        for h in handles:
            h.remove()
    found = [p for p in peaks if p is not None]
    if len(found) < len(layers):
        raise RuntimeError("smoothquant: some Linear layers were not reached by the calibration batches")
    return found, norm_fed


def smoothing_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha)`` for a weight ``(out, in)``; ranges floored at 1e-5."""
    w_max = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    return (act_max.clamp_min(1e-5).pow(alpha) / w_max.pow(1.0 - alpha)).clamp_min(1e-5)


@register_algorithm("smoothquant", options=SmoothQuantOptions)
def smoothquant(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """Smooth the selected layers of a calibrated model and re-calibrate their grids; no loss curve.

    Statistics come from the float model on ``batches``. Each selected layer's input and weight quantizer get
    the same factors; the weight grid is re-taken from ``W·s`` and the input range calibrated again on ``x/s``
    (the model running in float). Layers outside ``scope`` keep the plain observer grids.
    """
    opts: SmoothQuantOptions = cfg.options if isinstance(cfg.options, SmoothQuantOptions) else SmoothQuantOptions()
    opts.check()
    named = smoothable_layers(model)
    with eval_then_quantized(model):
        peaks, norm_fed = input_statistics(model, [layer for _, layer in named], batches, run_batch)
        chosen = [i for i in range(len(named)) if opts.scope == "all" or norm_fed[i]]
        if not chosen:
            raise ValueError(
                f"ptq.scope={opts.scope!r}: no smoothquant layer of {type(model).__name__} takes a LayerNorm/RMSNorm "
                "output; use ptq.scope=all to smooth every one"
            )
        inputs: list[SmoothQuantizer] = []
        for step, i in enumerate(chosen):
            name, layer = named[i]
            inq = cast(SmoothQuantizer, layer.input_quantizer)  # both checked by smoothable_layers
            wq = cast(SmoothQuantizer, layer.weight_quantizer)
            w = layer.weight_to_quantize().detach()
            s = smoothing_factors(peaks[i], w, opts.alpha)
            inq.smoothing_factors, wq.smoothing_factors = s.clone(), s.clone()
            with quant_state([wq], calibrate=False):
                wq.observe(w * s.to(w.dtype))  # a weight's grid: the range of the smoothed weight
            inq.reset_range()
            inputs.append(inq)
            if progress is not None:
                progress(ProgressReport("smoothquant", name, step, len(chosen), 1, 1, math.nan))
        fresh = nn.ModuleList(inputs)
        with quant_state(model, fake_quant=False, calibrate=False):  # the model runs in float; only these observe
            calibrate(fresh, batches, run_batch)
        finalize(fresh)
    return {}
