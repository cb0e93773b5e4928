"""AWQ (Lin et al., MLSys 2024): activation-aware weight quantization with per-input-channel scales.

Input channels that carry large activations matter most to a Linear layer's output. AWQ scales weight column
``j`` up by ``s_j`` before quantizing and the dequantized column back down by ``s_j`` (the paper folds the
``1/s`` into the previous operator; with fake-quantized weights the exact equivalent is ``Q(W·diag(s))·diag(s)⁻¹``),
so those columns get a relatively finer grid. ``s = mean|x|^α`` per channel, normalised by
``sqrt(max(s)·min(s))``; ``α`` is grid-searched in ``[0, 1)`` to minimise the layer's output error
``‖Q(W·diag(s))·diag(s)⁻¹·x − W·x‖²`` on calibration inputs. ``α = 0`` is round-to-nearest, so on the
calibration data AWQ never does worse than RTN. Then, as the paper's auto-clip, each group's range is shrunk
(down to ``1 − max_shrink`` of its maximum) where that lowers the group's share of the output error.

The scales live in :class:`AWQQuantizer` (recipe ``weights.method: awq``): the observer method applied to
``W·diag(s)``, with ``s`` a buffer, so checkpoints and state dicts carry it. Inputs come from the float model,
block by block (stopping after each block), as the paper's search does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.nn.modules import QuantizedLayer, is_linear
from lightning_quant.ptq.blocks import transformer_units
from lightning_quant.ptq.capture import RunBatch, _stop_hook, run_until_stop
from lightning_quant.ptq.progress import Progress, ProgressReport
from lightning_quant.ptq.reconstruction import eval_then_quantized
from lightning_quant.ptq.registry import register_algorithm
from lightning_quant.ptq.settings import PTQConfig
from lightning_quant.quantizers import ObserverOptions, ObserverQuantizer, QuantizerConfig, register_quantizer
from lightning_quant.quantizers.base import Role
from lightning_quant.quantizers.grid import ExportGrid, NoIntegerGrid
from lightning_quant.quantizers.modes import quant_state
from lightning_quant.registry import OptionError


@dataclass
class AWQOptions:
    """AWQ's settings (``ptq`` recipe keys when ``algorithm: awq``). Defaults are the paper's."""

    grid: int = 20  # exponents tried for s = mean|x|^alpha: alpha = 0, 1/grid, ..., (grid-1)/grid
    clip: bool = True  # also search each group's clipping range (the paper's auto-clip)
    clip_grid: int = 20  # clipping ranges tried: max * (1 - i/clip_grid) ...
    max_shrink: float = 0.5  # ... for i/clip_grid below max_shrink
    clip_skip: list[str] = field(default_factory=lambda: ["query", "key", "q_proj", "k_proj"])  # keep full range

    def check(self) -> None:
        """Refuse values the search cannot use."""
        if self.grid < 1:
            raise OptionError("grid", self.grid, "must be >= 1")
        if self.clip_grid < 1:
            raise OptionError("clip_grid", self.clip_grid, "must be >= 1")
        if not 0 <= self.max_shrink < 1:
            raise OptionError("max_shrink", self.max_shrink, "allowed: 0 <= max_shrink < 1")


class AWQExportError(ValueError):
    """An AWQ-scaled weight asked for integer codes: its ``1/s`` per input channel has no export form yet."""


_NO_EXPORT = (
    "AWQ divides each dequantized input column by its own scale s, which integer export cannot express yet "
    "(the codes are those of W·diag(s)); export this layer from another recipe"
)


@register_quantizer("awq", options=ObserverOptions)
class AWQQuantizer(ObserverQuantizer):
    """The observer method on ``W·diag(s)``, divided back by ``s``: ``Q(W·diag(s))·diag(s)⁻¹``.

    ``input_scale`` holds ``s`` (one per input channel, the weight's axis 1); empty (the default, before AWQ
    ran) it is plain observer quantization. Grids are per group along the input (``group_size`` equal to the
    input width is per output channel). Example::

        q = AWQQuantizer(QuantizerConfig(bits=4, granularity="per_group", group_size=128), "weight", groups)
        q.set_input_scale(layer.weight, s)  # the grid is re-taken from W·diag(s)
    """

    roles = ("weight",)
    granularities = ("per_group",)

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.register_buffer("input_scale", torch.ones(0))

    def _scale_view(self, w: torch.Tensor) -> torch.Tensor:
        if w.dim() < 2 or w.shape[1] != self.input_scale.numel():
            raise ValueError(
                f"'{self.qualname}': AWQ scales for {self.input_scale.numel()} input channels, weight {tuple(w.shape)}"
            )
        return self.input_scale.reshape(1, -1, *[1] * (w.dim() - 2)).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_scale.numel():
            return super().forward(x)
        s = self._scale_view(x)
        return super().forward(x * s) / s

    @torch.no_grad()
    def set_input_scale(self, w: torch.Tensor, s: Optional[torch.Tensor]) -> None:
        """Use ``s`` (None: no scaling) for weight ``w`` and take the grid from ``W·diag(s)`` (min-max per group)."""
        self.input_scale = torch.ones(0, device=w.device) if s is None else s.detach().float().clone()
        scaled = w * self._scale_view(w) if s is not None else w
        self.observe(scaled.detach())

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fix each group's range (of the scaled weight), e.g. a clipped one, and its scale and zero point."""
        self.observer.reset_to(lo, hi)
        self.update_qparams()

    def integer_codes(self, w: torch.Tensor) -> torch.Tensor:
        if self.input_scale.numel():
            raise AWQExportError(f"'{self.qualname}': {_NO_EXPORT}")
        return super().integer_codes(w)

    def export_grid(self) -> ExportGrid:
        """None once scaled (the per-column ``1/s`` is not a grid); before AWQ ran, the observer method's grid."""
        if self.input_scale.numel():
            return NoIntegerGrid(f"AWQQuantizer: {_NO_EXPORT}")
        return super().export_grid()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "input_scale")
        if saved is not None and saved.shape != self.input_scale.shape:
            self.input_scale = torch.zeros_like(saved)  # size the buffer to the saved scales before loading
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        scaled = f", awq scales ({self.input_scale.numel()})" if self.input_scale.numel() else ""
        return super().extra_repr() + scaled


class _Inputs:
    """Over every row ``x`` a layer receives: the per-channel mean ``|x|`` and the second moment ``E[x xᵀ]``.

    The second moment gives any weight error's output error exactly, ``E‖x·Dᵀ‖² = Σ (D·H) ⊙ D``, at a cost
    that does not grow with the number of calibration tokens (as GPTQ's Hessian).
    """

    def __init__(self, layer: QuantizedLayer) -> None:
        self.layer = layer
        features = int(layer.in_features)  # type: ignore[arg-type]
        device = layer.weight.device
        self.abs_sum = torch.zeros(features, device=device)
        self.gram = torch.zeros(features, features, device=device)
        self.count = 0
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = self.layer.quantized_input(args[0].detach())
        rows = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += rows.abs().sum(0)
        self.gram.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.handle.remove()
        return self.abs_sum / self.count, self.gram / self.count


def _scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x|^α``, kept away from 0 and normalised so that ``max(s)·min(s) = 1`` (as the paper's code)."""
    s = mean_abs.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(q: AWQQuantizer, w: torch.Tensor, h: torch.Tensor) -> float:
    """Mean squared output error of the quantized weight, ``E_x mean_c (x·(ŵ_c − w_c))²``, from ``h = E[x xᵀ]``."""
    d = q(w) - w
    return float(((d @ h) * d).sum() / d.shape[0])


@torch.no_grad()
def search_scale(
    q: AWQQuantizer, w: torch.Tensor, mean_abs: torch.Tensor, h: torch.Tensor, grid: int
) -> tuple[float, list[float]]:
    """Grid-search ``α`` for ``q`` (left with the best scales and their grid); returns (best α, error per α)."""
    losses: list[float] = []
    for step in range(grid):
        q.set_input_scale(w, _scales(mean_abs, step / grid) if step else None)
        losses.append(output_error(q, w, h))
    best = min(range(grid), key=losses.__getitem__)
    q.set_input_scale(w, _scales(mean_abs, best / grid) if best else None)
    return best / grid, losses


@torch.no_grad()
def search_clip(q: AWQQuantizer, w: torch.Tensor, h: torch.Tensor, opts: AWQOptions) -> float:
    """Shrink each group's range where that lowers its own output error ``E (x_g · (ŵ_g − w_g))²``.

    Ranges are symmetric cuts ``[-m, m]`` of the scaled weight's group (``m = max|w| · (1 − i/clip_grid)``),
    intersected with its min-max range. Returns the layer's output error after clipping.
    """
    rows, cols = w.shape
    gs = q.group_size
    groups = cols // gs
    blocks = torch.stack([h[g * gs : (g + 1) * gs, g * gs : (g + 1) * gs] for g in range(groups)])  # E[x_g x_gᵀ]
    scaled = q.rows(w * q._scale_view(w)) if q.input_scale.numel() else q.rows(w)
    lo, hi = scaled.amin(1), scaled.amax(1)
    peak = scaled.abs().amax(1)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(math.ceil(opts.max_shrink * opts.clip_grid)):
        m = peak * (1 - i / opts.clip_grid)
        cut_lo, cut_hi = torch.maximum(lo, -m), torch.minimum(hi, m)
        q.set_range(cut_lo, cut_hi)
        d = (q(w) - w).reshape(rows, groups, gs)
        err = torch.einsum("cgk,gkl,cgl->cg", d, blocks, d).reshape(-1)  # one per (row, group), as q.rows orders them
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, cut_lo, best_lo), torch.where(better, cut_hi, best_hi)
    q.set_range(best_lo, best_hi)
    return output_error(q, w, h)


def _targets(model: nn.Module) -> list[tuple[str, QuantizedLayer, AWQQuantizer]]:
    """Linear layers with a weight quantizer, each checked to be an :class:`AWQQuantizer`."""
    found = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLayer) or layer.weight_quantizer is None:
            continue
        q = layer.weight_quantizer
        if not isinstance(q, AWQQuantizer):
            raise ValueError(
                f"ptq.algorithm=awq: layer '{name}' has a {type(q).__name__} weight quantizer; AWQ keeps its scales "
                "in AWQQuantizer: set weights.method: awq (as recipes/awq_w4g128.yaml does)"
            )
        if not is_linear(layer):
            raise ValueError(f"ptq.algorithm=awq: layer '{name}' ({type(layer).__name__}) is not a Linear layer")
        found.append((name, layer, q))
    return found


@torch.no_grad()
def _capture(
    model: nn.Module, last: nn.Module, layers: dict[str, QuantizedLayer], batches: Sequence[Any], run_batch: RunBatch
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Input statistics of ``layers`` (by name) in the float model; each batch runs only to the end of ``last``."""
    recorders = [_Inputs(layer) for layer in layers.values()]
    handle = last.register_forward_hook(_stop_hook)
    try:
        with quant_state(model, fake_quant=False):
            run_until_stop(batches, run_batch)
    finally:
        handle.remove()
        results = [r.result() if r.count else None for r in recorders]
    missing = [name for name, r in zip(layers, results) if r is None]
    if missing:
        raise RuntimeError(f"awq: layer '{missing[0]}' was not called while the calibration data ran")
    return results  # type: ignore[return-value]


@register_algorithm("awq", options=AWQOptions)
def awq(
    model: nn.Module, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, progress: Optional[Progress]
) -> dict[str, list[float]]:
    """AWQ scale (and clip) search for every Linear layer, block by block; returns each layer's error per ``α``."""
    opts: AWQOptions = cfg.options if isinstance(cfg.options, AWQOptions) else AWQOptions()
    opts.check()
    targets = _targets(model)
    by_layer = {id(layer): (name, q) for name, layer, q in targets}
    units = transformer_units(model, cfg)
    curves: dict[str, list[float]] = {}
    with eval_then_quantized(model):
        for index, unit in enumerate(units):
            layers = {by_layer[id(m)][0]: m for m in unit.layers() if id(m) in by_layer}
            if not layers:
                continue
            inputs = _capture(model, unit.modules[-1], layers, batches, run_batch)
            total = 0.0
            for layer, (mean_abs, h) in zip(layers.values(), inputs):
                name, q = by_layer[id(layer)]
                w = layer.weight_to_quantize().detach().float()
                _, losses = search_scale(q, w, mean_abs, h, opts.grid)
                curves[name] = losses
                error = min(losses)
                if opts.clip and not any(part in name.split(".")[-1] for part in opts.clip_skip):
                    error = search_clip(q, w, h, opts)
                total += error
            if progress is not None:
                progress(ProgressReport("awq", unit.name, index, len(units), 1, 1, total))
    return curves
