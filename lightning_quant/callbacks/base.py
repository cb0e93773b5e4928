"""What the recipe-driven callbacks share: recipe loading, model surgery in ``setup`` and checkpoints."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from typing_extensions import override

from lightning_quant.deploy import FORMATS, ExportError, export, format_for
from lightning_quant.nn import QuantizationReport, quantize_model, quantized_layers
from lightning_quant.quantizers import Quantizer
from lightning_quant.recipes import Recipe, RecipeError, load_recipe, override_list

_CKPT_KEY = "lightning_quant"


def _quantizers(model: torch.nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def _added(module: torch.nn.Module) -> bool:
    """Modules that quantization added to the user's model: quantizers, and marked ones (ReActNet's RPReLU)."""
    return isinstance(module, Quantizer) or getattr(module, "added_by_quantization", False)


def _quantizer_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys that belong to quantizers and other added modules (their parameters and buffers)."""
    keys: set[str] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if _added(module):
            keys.update(f"{prefix}.{k}" if prefix else k for k in module.state_dict())
    return keys


class RecipeCallback(Callback):
    """Base class: loads and checks the recipe, swaps layers in ``setup`` and carries quantizer state.

    Checkpoints keep the float model's keys in ``state_dict`` (so ``YourModule.load_from_checkpoint``
    works on the plain class) and the quantizer state under ``checkpoint["lightning_quant"]``, which
    ``on_load_checkpoint`` restores after checking that the recipe matches.
    """

    kinds: tuple[str, ...] = ()

    def __init__(
        self,
        recipe: Union[str, dict, DictConfig, Recipe],
        overrides: Optional[list[str]] = None,
        weight_bits: Optional[int] = None,
        activation_bits: Optional[int] = None,
        export_path: Optional[str] = None,
        export_format: Optional[str] = None,
    ) -> None:
        extra = override_list(overrides)  # one string is one override
        if weight_bits is not None:
            extra.append(f"weights.bits={weight_bits}")
        if activation_bits is not None:
            extra.append(f"activations.bits={activation_bits}")
        try:
            self.recipe = load_recipe(recipe, extra)
        except RecipeError as err:
            raise MisconfigurationException(str(err)) from err
        self.check_recipe(self.recipe)
        self.report: Optional[QuantizationReport] = None
        self.export_path = export_path
        self.export_format = export_format
        if export_path is not None:
            try:
                self.export_format = format_for(export_path, export_format)
            except ExportError as err:
                raise MisconfigurationException(str(err)) from err
            if self.export_format not in FORMATS:
                raise MisconfigurationException(f"export_format={export_format!r}; allowed: {list(FORMATS)}")

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse recipes this callback cannot run (before anything else happens)."""
        if recipe.kind not in self.kinds:
            raise MisconfigurationException(
                f"{recipe.source}: kind={recipe.kind!r} is not allowed for {type(self).__name__}; "
                f"allowed: {list(self.kinds)}"
            )

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(recipe=self.recipe.name)

    def prepare(self, pl_module: pl.LightningModule) -> bool:
        """Swap the recipe's layers for quantized ones; returns True if they were already swapped."""
        already = bool(quantized_layers(pl_module))
        self.report = quantize_model(pl_module, self.recipe.weights, self.recipe.activations, self.recipe.layers)
        for msg in self.report.warnings:
            rank_zero_warn(msg)
        if not self.report.quantized:
            raise MisconfigurationException(
                f"{self.recipe.source}: no layer of {type(pl_module).__name__} matched layers.types="
                f"{self.recipe.layers.types} / include={self.recipe.layers.include}; nothing would be quantized"
            )
        if self.recipe.diagnostics.summary and not already:
            rank_zero_info(f"lightning-quant: recipe {self.recipe.name!r}\n{self.report.table()}")
        return already

    def export_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any = None) -> None:
        """Write the quantized model to ``export_path`` (rank 0 only), if one was given.

        The example input is ``pl_module.example_input_array``, else the first sample of ``batch`` or of the
        datamodule's train dataloader.
        """
        if self.export_path is None or not trainer.is_global_zero:
            return
        example = getattr(pl_module, "example_input_array", None)
        if example is None and batch is None and trainer.datamodule is not None:
            batch = next(iter(trainer.datamodule.train_dataloader()))
        if example is None and batch is not None:
            example = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(example, torch.Tensor):
            raise MisconfigurationException(
                "lightning-quant: export needs a tensor example input; set `example_input_array` on the LightningModule"
            )
        was_training = pl_module.training
        try:
            path = export(pl_module, example[:1], self.export_path, self.export_format)
        finally:
            pl_module.train(was_training)
        rank_zero_info(f"lightning-quant: exported {self.recipe.name} ({self.export_format}) to {path}")

    # -- evaluation --------------------------------------------------------------------------------------
    def _start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set quantizers up for a validate/test/predict loop (subclasses)."""

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module)

    # -- checkpoints -------------------------------------------------------------------------------------
    def _check_fingerprint(self, fingerprint: Optional[str], recipe_yaml: str) -> None:
        if fingerprint is not None and fingerprint != self.recipe.fingerprint():
            raise MisconfigurationException(
                f"lightning-quant: the checkpoint was made with a different recipe than {self.recipe.name!r} "
                f"({self.recipe.source}); its weights/activations/layers settings differ. The checkpoint's "
                f"recipe was:\n{recipe_yaml}"
            )

    def extra_checkpoint_state(self) -> dict[str, Any]:
        """More entries for ``checkpoint["lightning_quant"]`` (subclasses)."""
        return {}

    def load_extra_checkpoint_state(self, saved: dict[str, Any]) -> None:
        """Counterpart of :meth:`extra_checkpoint_state`."""

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("state_dict", {})
        keys = _quantizer_keys(pl_module)
        checkpoint[_CKPT_KEY] = {
            "fingerprint": self.recipe.fingerprint(),
            "recipe": self.recipe.to_yaml(),
            "quantizer_state": {k: state.pop(k) for k in list(state) if k in keys},
            **self.extra_checkpoint_state(),
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(_CKPT_KEY)
        if saved is None:
            return
        self._check_fingerprint(saved.get("fingerprint"), saved.get("recipe", ""))
        load_quantizer_state(pl_module, saved["quantizer_state"])
        self.load_extra_checkpoint_state(saved)


def load_quantizer_state(pl_module: torch.nn.Module, quant_state: dict[str, Any]) -> None:
    """Load every quantizer's state from a flat ``{state-dict key: tensor}`` mapping (all keys required)."""
    expected = _quantizer_keys(pl_module)
    missing = sorted(expected - set(quant_state))
    if missing:
        raise MisconfigurationException(f"lightning-quant: checkpoint lacks quantizer state for {missing[:5]}")
    for prefix, module in pl_module.named_modules(remove_duplicate=False):
        if _added(module):
            own = {k[len(prefix) + 1 :]: v for k, v in quant_state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(own, strict=True)


def quantizer_state(pl_module: torch.nn.Module) -> dict[str, Any]:
    """Every quantizer's state as a flat ``{state-dict key: tensor}`` mapping."""
    keys = _quantizer_keys(pl_module)
    return {k: v for k, v in pl_module.state_dict().items() if k in keys}
