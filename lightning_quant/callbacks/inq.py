"""Incremental Network Quantization (Zhou et al., ICLR 2017) and ELQ (Zhou et al., CVPR 2018) as a callback.

Weights become powers of two (or zero) in stages: at each stage the recipe's accumulated portion of every
layer's weights, largest magnitudes first (or at random), is rounded to the level set and frozen, while
the rest keep training to compensate. Frozen weights have their gradients masked and are restored after
every optimizer step, so weight decay or momentum cannot move them either.

ELQ uses the same incremental machinery with ternary ``{−α, 0, α}`` or binary ``{−α, α}`` levels and a
loss-error-aware partition. ELQ's exact objective is not public; what is implemented here: each weight's
score is the first-order loss change its quantization causes, ``g·(q(w) − w)`` with ``g`` the running mean of
its gradient since the last stage, plus ``error_weight`` times its squared approximation error
``(q(w) − w)²``, both terms normalised by their mean over the layer; the weights with the lowest scores
(least harm) are quantized first. ``α`` is fitted once per layer as TWN does (threshold ``0.7·mean|w|``,
``α`` the mean magnitude above it) or as ``mean|w|`` for binary levels.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from torch import nn
from typing_extensions import override

from lightning_quant.callbacks.base import RecipeCallback
from lightning_quant.callbacks.diagnostics import log_metrics
from lightning_quant.callbacks.guards import recipe_mismatch_message
from lightning_quant.nn.report import LayerSelectionError, QuantizationReport
from lightning_quant.nn.surgery import select_layers
from lightning_quant.recipes import Recipe


def level_exponents(weight: torch.Tensor, bits: int) -> tuple[int, int]:
    """INQ's level set ``{±2^n2, …, ±2^n1, 0}``: ``n1 = floor(log2(4·max|W|/3))``, ``n2 = n1 + 1 − 2^(b−1)/2``."""
    top = float(weight.detach().abs().max())
    n1 = math.floor(math.log2(4 * top / 3)) if top > 0 else 0
    return n1, n1 + 1 - 2 ** (bits - 1) // 2


def to_levels(weight: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Round to the nearest level (arithmetic midpoints between powers); below ``2^n2 / 2`` becomes 0."""
    mag = weight.abs()
    exponent = torch.floor(torch.log2(mag.clamp_min(1e-30) * 4 / 3)).clamp(n2, n1)
    return torch.where(mag < 2.0**n2 / 2, torch.zeros_like(weight), torch.sign(weight) * torch.pow(2.0, exponent))


def ternary_alpha(weight: torch.Tensor) -> tuple[float, float]:
    """TWN's threshold ``Δ = 0.7·mean|w|`` and scale ``α`` = mean |w| above it."""
    mag = weight.detach().abs()
    delta = 0.7 * float(mag.mean())
    above = mag[mag > delta]
    return delta, float(above.mean()) if above.numel() else float(mag.mean())


def to_ternary(weight: torch.Tensor, delta: float, alpha: float) -> torch.Tensor:
    """``α·sign(w)`` where ``|w| > Δ``, else 0 (``Δ < 0`` gives binary levels)."""
    return torch.where(weight.abs() > delta, torch.sign(weight) * alpha, torch.zeros_like(weight))


def loss_aware_score(
    weight: torch.Tensor, quantized: torch.Tensor, grad: torch.Tensor, error_weight: float
) -> torch.Tensor:
    """ELQ-style harm of quantizing each weight: normalised first-order loss change plus approximation error."""
    step = quantized - weight
    change = grad * step
    error = step * step
    return change / change.abs().mean().clamp_min(1e-12) + error_weight * error / error.mean().clamp_min(1e-12)


def layer_weight(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` as the tensor it is: INQ selects only layers surgery can swap, each with a weight tensor."""
    return cast(torch.Tensor, layer.weight)


class IncrementalQuantization(RecipeCallback):
    """Train a LightningModule into power-of-two weights, stage by stage, as an ``inq_*`` recipe says.

    Stage ``k`` starts at epoch ``inq.epochs[k]`` and leaves ``inq.portions[k]`` of each selected layer's
    weights quantized and frozen. Layers are chosen by the ``layers`` section with the same rules as the other
    callbacks (first/last layer, include/exclude, overrides: ``skip``, and ``weight_bits`` for power-of-two
    levels); the layers stay float modules whose weights reach the levels. The level set per layer follows the
    paper (its bits, one code for zero), computed from the layer's weights when its first stage starts. Masks
    and frozen values are saved in the checkpoint, so ``fit(ckpt_path=...)`` resumes mid-schedule; a checkpoint
    made under another recipe is refused. Example::

        trainer = L.Trainer(max_epochs=8, callbacks=[IncrementalQuantization("inq_5bit")])
        trainer.fit(model, datamodule=dm)
    """

    kinds = ("inq",)

    def __init__(
        self, recipe: Union[str, dict, DictConfig, Recipe] = "inq_5bit", overrides: Union[str, list[str], None] = None
    ):
        super().__init__(recipe, overrides)
        self._hooked: set[int] = set()  # weights whose gradient this instance masks (hooks stay for their life)

    @override
    def reset_run_state(self) -> None:
        """Forget a previous run's stages and masks (on another model): a reused instance acts as a new one."""
        super().reset_run_state()
        self.exponents: dict[str, tuple[int, int]] = {}
        self.ternary: dict[str, tuple[float, float]] = {}  # ELQ: (threshold, alpha) per layer
        self.grad_mean: dict[str, torch.Tensor] = {}
        self.grad_steps: dict[str, int] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        self.stage = -1
        self._selected: dict[str, tuple[nn.Module, int]] = {}  # this run's layers and their bits, from setup
        self._warned: set[str] = set()  # surgery warnings already given for this model

    def select(self, model: nn.Module, report: Optional[QuantizationReport] = None) -> dict[str, tuple[nn.Module, int]]:
        """The layers the ``layers`` section selects, by surgery's rules, each with its weight bits.

        A name glob that matches no module raises :class:`LayerSelectionError`.
        """
        r = self.recipe
        choices = select_layers(model, r.weights, r.activations, r.layers, report or QuantizationReport())
        return {c.name: (c.module, c.weights.bits) for c in choices if c.kept is None and c.weights is not None}

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The selected layers by name (see :meth:`select`)."""
        return {name: module for name, (module, _) in self.select(model).items()}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.begin_setup(trainer, pl_module)
        report = QuantizationReport()
        try:
            self._selected = self.select(pl_module, report)
        except LayerSelectionError as err:
            raise MisconfigurationException(f"{self.recipe.source}: {err}") from err
        if not self._selected:
            raise MisconfigurationException(
                f"{self.recipe.source}: no layer matched layers.types={self.recipe.layers.types}"
            )
        for msg in report.warnings:  # a layer with parameters of a type INQ cannot quantize
            if msg not in self._warned:
                self._warned.add(msg)
                rank_zero_warn(msg)
        for name, (layer, _) in self._selected.items():
            if id(layer_weight(layer)) not in self._hooked:
                layer_weight(layer).register_hook(lambda grad, name=name: self._mask_grad(name, grad))
                self._hooked.add(id(layer_weight(layer)))

    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if self.recipe.inq.partition == "loss_aware":  # running mean of the gradient since the last stage
            n = self.grad_steps.get(name, 0) + 1
            mean = self.grad_mean.get(name)
            g = grad.detach()
            self.grad_mean[name] = g.clone() if mean is None or n == 1 else mean + (g - mean) / n
            self.grad_steps[name] = n
        mask = self.masks.get(name)
        return grad if mask is None else grad.masked_fill(mask, 0.0)

    def quantize_values(self, name: str, w: torch.Tensor, bits: int) -> torch.Tensor:
        """``w`` on the layer's level set (powers of two at ``bits``, ternary or binary)."""
        levels = self.recipe.inq.levels
        if levels == "pow2":
            if name not in self.exponents:
                self.exponents[name] = level_exponents(w, bits)
            return to_levels(w, *self.exponents[name])
        if name not in self.ternary:
            self.ternary[name] = ternary_alpha(w) if levels == "ternary" else (-1.0, float(w.abs().mean()))
        return to_ternary(w, *self.ternary[name])

    def _mean_grad(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The gradient mean since the last stage, averaged over DDP ranks (so every rank picks the same weights)."""
        g = self.grad_mean.get(name, torch.zeros_like(w)).clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(g)
            g /= torch.distributed.get_world_size()
        return g

    def _quantize_stage(self, pl_module: pl.LightningModule, stage: int) -> None:
        inq = self.recipe.inq
        generator = torch.Generator().manual_seed(inq.seed + stage)
        for name, (layer, bits) in self.select(pl_module).items():
            w = layer_weight(layer).data
            q = self.quantize_values(name, w, bits)
            mask = self.masks.get(name, torch.zeros_like(w, dtype=torch.bool))
            target = round(inq.portions[stage] * w.numel())
            extra = target - int(mask.sum())
            if extra > 0:
                if inq.partition == "magnitude":
                    score = w.abs().masked_fill(mask, -1.0).flatten()
                elif inq.partition == "loss_aware":  # lowest harm first: topk of the negated score
                    harm = loss_aware_score(w, q, self._mean_grad(name, w), inq.error_weight)
                    score = (-harm).masked_fill(mask, -math.inf).flatten()
                else:
                    score = torch.rand(w.numel(), generator=generator).to(w.device).masked_fill(mask.flatten(), -1.0)
                pick = torch.topk(score, extra).indices
                new = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
                new[pick] = True
                new = new.reshape(w.shape)
                w[new] = q[new]
                mask = mask | new
            self.masks[name] = mask
            self.frozen[name] = w.clone()
            self.grad_mean.pop(name, None)
            self.grad_steps.pop(name, None)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = self.recipe.inq.epochs
        due = max((k for k, e in enumerate(epochs) if e <= trainer.current_epoch), default=-1)
        while self.stage < due:
            self.stage += 1
            self._quantize_stage(pl_module, self.stage)
            rank_zero_info(
                f"lightning-quant: INQ stage {self.stage + 1}/{len(epochs)}: "
                f"{100 * self.recipe.inq.portions[self.stage]:.1f}% of the weights on {self.recipe.inq.levels} levels"
            )
        log_metrics(trainer, {"inq/quantized_fraction": self.quantized_fraction(), "inq/stage": float(self.stage + 1)})

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        with torch.no_grad():
            for name, (layer, _) in self._selected.items():
                mask = self.masks.get(name)
                if mask is not None:
                    layer_weight(layer).data[mask] = self.frozen[name][mask]

    def quantized_fraction(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / total if total else 0.0

    # -- checkpoints: the recipe's fingerprint and levels are checked before any state is used ------------
    def _check_levels(self, levels: Optional[str], recipe_yaml: str) -> None:
        """The level set shapes the frozen weights but is no part of the fingerprint (weights, activations, layers)."""
        if levels is not None and levels != self.recipe.inq.levels:
            header = recipe_mismatch_message(recipe_yaml, self.recipe).split("\n")[0]
            raise MisconfigurationException(f"{header}\n  inq.levels: {levels} -> {self.recipe.inq.levels}")

    @override
    def extra_checkpoint_state(self) -> dict[str, Any]:
        return {"levels": self.recipe.inq.levels}

    @override
    def load_extra_checkpoint_state(self, saved: dict[str, Any]) -> None:
        self._check_levels(saved.get("levels"), saved.get("recipe", ""))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.recipe.fingerprint(),
            "recipe": self.recipe.to_yaml(),
            "levels": self.recipe.inq.levels,
            "stage": self.stage,
            "exponents": dict(self.exponents),
            "ternary": dict(self.ternary),
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "frozen": {k: v.cpu() for k, v in self.frozen.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_fingerprint(state_dict.get("fingerprint"), state_dict.get("recipe", ""))
        self._check_levels(state_dict.get("levels"), state_dict.get("recipe", ""))
        self.stage = int(state_dict["stage"])
        self.exponents = {k: tuple(v) for k, v in state_dict["exponents"].items()}
        self.ternary = {k: tuple(v) for k, v in state_dict.get("ternary", {}).items()}
        self.masks = dict(state_dict["masks"])
        self.frozen = dict(state_dict["frozen"])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self.masks = {k: v.to(device) for k, v in self.masks.items()}
        self.frozen = {k: v.to(device) for k, v in self.frozen.items()}
