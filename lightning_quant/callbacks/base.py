"""What the recipe-driven callbacks share: recipe loading, model surgery in ``setup`` and checkpoints."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig
from typing_extensions import override

from lightning_quant.callbacks.guards import (
    check_export_target,
    check_only_quantization_callback,
    recipe_mismatch_message,
    run_checkpoint_hook_after_writers,
)
from lightning_quant.export import FORMATS, ExportError, export, format_for
from lightning_quant.nn import LayerSelectionError, QuantizationReport, quantize_model, quantized_layers
from lightning_quant.nn.summary import ModelSummary, summarize
from lightning_quant.nn.surgery import RECIPE_ATTR
from lightning_quant.quantizers import Quantizer
from lightning_quant.recipes import Recipe, RecipeError, load_recipe, override_list

_CKPT_KEY = "lightning_quant"
_WARNED_ATTR = "_lightning_quant_warned"  # on the model: the surgery warnings already given for it


def batch_input(batch: Any) -> Any:
    """The model input in a batch, as the callbacks feed it: a tensor is the input, a list/tuple's first item is,
    and a dict holds keyword arguments."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def batch_head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (every tensor with a batch dimension is sliced)."""
    return apply_to_collection(batch, torch.Tensor, lambda t: t[:n] if t.dim() else t)


def batch_size(batch: Any) -> int:
    """The batch dimension of the first tensor in a batch that has one."""
    sizes: list[int] = []
    apply_to_collection(batch, torch.Tensor, lambda t: sizes.append(t.shape[0]) if t.dim() else None)
    if not sizes:
        raise MisconfigurationException("lightning-quant: a calibration batch holds no tensor with a batch dimension")
    return sizes[0]


def default_forward(module: torch.nn.Module, batch: Any) -> Any:
    """How a batch reaches the model when the LightningModule defines no ``calibration_forward``:
    a tensor is the input, a list/tuple's first item is the input, a dict is passed as keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return module(batch)
    if isinstance(batch, (list, tuple)):
        return module(batch[0])
    if isinstance(batch, dict):
        return module(**batch)
    raise MisconfigurationException(
        f"lightning-quant: cannot feed a batch of type {type(batch).__name__} to the model; "
        "define `calibration_forward(self, batch)` on your LightningModule"
    )


def _quantizers(model: torch.nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def _added_by_quantization(module: torch.nn.Module) -> bool:
    """Modules that quantization added to the user's model: quantizers, and marked ones (ReActNet's RPReLU)."""
    return isinstance(module, Quantizer) or getattr(module, "added_by_quantization", False)


def _quantizer_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys that belong to quantizers and other added modules (their parameters and buffers)."""
    keys: set[str] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if _added_by_quantization(module):
            keys.update(f"{prefix}.{k}" if prefix else k for k in module.state_dict())
    return keys


class RecipeCallback(Callback):
    """Base class: loads and checks the recipe, swaps layers in ``setup`` and carries quantizer state.

    Checkpoints keep the float model's keys in ``state_dict`` (so ``YourModule.load_from_checkpoint``
    works on the plain class) and the quantizer state under ``checkpoint["lightning_quant"]``, which
    ``on_load_checkpoint`` restores after checking that the recipe matches.
    """

    kinds: tuple[str, ...] = ()
    quantizes_model = True  # one such callback per Trainer

    def __init__(
        self,
        recipe: Union[str, dict, DictConfig, Recipe],
        overrides: Union[str, list[str], None] = None,
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
        self.export_path = export_path
        self.export_format = export_format
        if export_path is not None:
            try:
                self.export_format = format_for(export_path, export_format)
            except ExportError as err:
                raise MisconfigurationException(str(err)) from err
            if self.export_format not in FORMATS:
                raise MisconfigurationException(f"export_format={export_format!r}; allowed: {list(FORMATS)}")
            check_export_target(self.recipe, export_path, self.export_format)
        self._model: Optional[weakref.ref] = None  # the model of the current run
        self.reset_run_state()

    def reset_run_state(self) -> None:
        """Forget what a previous run on another model left, so a reused instance acts as a fresh one.

        Subclasses extend it with their own per-run attributes; ``__init__`` calls it too.
        """
        self.report: Optional[QuantizationReport] = None
        self._example: Optional[torch.Tensor] = None  # export's example input, from the first batch
        self._summary_pending = False  # MACs/BOPs wait for the first real batch (no example_input_array)

    def begin_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks and bookkeeping every ``setup`` starts with (subclasses call it first).

        Another model starts a new run: per-run state (step counts, calibration, ...) is reset, so the instance
        behaves as a fresh one would. The same model carries on (``fit`` then ``test``, or a second Trainer that
        continues it), since that state describes the model's quantizers.
        """
        check_only_quantization_callback(trainer, self)
        run_checkpoint_hook_after_writers(trainer, self)
        if self._model is None or self._model() is not pl_module:
            self.reset_run_state()
            self._model = weakref.ref(pl_module)

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
        """Swap the recipe's layers for quantized ones; returns True if they were already swapped.

        A model already quantized under another recipe is refused: its quantizers would silently stay the old
        recipe's while checkpoints were labelled with the new one.
        """
        already = bool(quantized_layers(pl_module))
        previous = pl_module.__dict__.get(RECIPE_ATTR)
        if already and previous is not None and previous[2] != self.recipe.fingerprint():
            raise MisconfigurationException(
                f"lightning-quant: {type(pl_module).__name__} was quantized with recipe {previous[0]!r} "
                f"({previous[1]}) and cannot be re-quantized with {self.recipe.name!r} ({self.recipe.source}): its "
                "layers keep the first recipe's quantizers. Start from the float model (a fresh instance, or "
                "lightning_quant.nn.dequantize_model(model)) or keep the first recipe."
            )
        try:
            self.report = quantize_model(pl_module, self.recipe.weights, self.recipe.activations, self.recipe.layers)
        except LayerSelectionError as err:
            raise MisconfigurationException(f"{self.recipe.source}: {err}") from err
        pl_module.__dict__[RECIPE_ATTR] = (self.recipe.name, self.recipe.source, self.recipe.fingerprint())
        warned = pl_module.__dict__.setdefault(_WARNED_ATTR, set())
        for msg in self.report.warnings:
            if msg not in warned:  # once per model, not at every stage's setup
                warned.add(msg)
                rank_zero_warn(msg)
        if not self.report.quantized:
            raise MisconfigurationException(
                f"{self.recipe.source}: no layer of {type(pl_module).__name__} matched layers.types="
                f"{self.recipe.layers.types} / include={self.recipe.layers.include}; nothing would be quantized"
            )
        self.label_methods(self.report)
        if self.recipe.diagnostics.summary and not already:
            rank_zero_info(f"lightning-quant: recipe {self.recipe.name!r}\n{self.report.table()}")
        return already

    def label_methods(self, report: QuantizationReport) -> None:
        """Adjust the surgery table's method column where the recipe's algorithm decides more than the quantizers
        (subclasses)."""

    # -- bit-aware summary -------------------------------------------------------------------------------
    def summarize(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, forward: Optional[Callable[[], Any]] = None
    ) -> ModelSummary:
        """Bits, memory, MACs and BOPs of the model; MACs are measured by ``forward`` (a real batch) or, without
        it, ``example_input_array``. Without either, MACs/BOPs are reported as not measured."""
        example = getattr(pl_module, "example_input_array", None)
        try:
            summary = summarize(pl_module, example if forward is None else None, forward)
        except Exception as err:  # noqa: BLE001 - a summary must never stop training; it says why it is partial
            rank_zero_warn(
                f"lightning-quant: the model summary could not run a forward ({type(err).__name__}: {err}); "
                "MACs and BOPs are not reported. Set `example_input_array` on the LightningModule to measure them."
            )
            summary = summarize(pl_module)
        return summary

    def export_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any = None) -> None:
        """Write the quantized model to ``export_path`` (rank 0 only), if one was given.

        The example input is ``pl_module.example_input_array``, else the first sample of ``batch`` or of the
        datamodule's train dataloader.
        """
        if self.export_path is None or not trainer.is_global_zero:
            return
        example = self.export_example(pl_module, batch)
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        if example is None and datamodule is not None:  # no batch seen in this run (e.g. resumed at the end)
            example = self.export_example(pl_module, next(iter(datamodule.train_dataloader())))
        if example is None:
            raise MisconfigurationException(
                "lightning-quant: export needs a tensor example input; set `example_input_array` on the LightningModule"
            )
        was_training = pl_module.training
        try:
            path = export(pl_module, example[:1], self.export_path, self.export_format)
        finally:
            pl_module.train(was_training)
        rank_zero_info(f"lightning-quant: exported {self.recipe.name} ({self.export_format}) to {path}")

    def export_example(self, pl_module: pl.LightningModule, batch: Any = None) -> Optional[torch.Tensor]:
        """The example input for export: ``example_input_array``, else the input of ``batch`` (or of the first
        batch this run saw). A batch whose input is not a tensor is refused at once, before any work is done."""
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, torch.Tensor):
            return example
        if batch is None:
            return self._example
        x = batch_input(batch)
        if not isinstance(x, torch.Tensor):
            raise MisconfigurationException(
                f"lightning-quant: export_path={self.export_path!r} needs a tensor example input, but the model's "
                f"input in a batch is a {type(x).__name__}; set `example_input_array` (a tensor) on the "
                f"LightningModule {type(pl_module).__name__}"
            )
        if self._example is None:
            self._example = x[:1].detach().clone()
        return self._example

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
            raise MisconfigurationException(recipe_mismatch_message(recipe_yaml, self.recipe))

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
    added = [
        (prefix, module)
        for prefix, module in pl_module.named_modules(remove_duplicate=False)
        if _added_by_quantization(module)
    ]
    unused = sorted(k for k in quant_state if not any(k.startswith(prefix + ".") for prefix, _ in added))
    if unused:  # state of a module this model lacks (e.g. an RPReLU the rebuild did not attach): never dropped
        raise MisconfigurationException(
            f"lightning-quant: the checkpoint holds quantizer state for modules this model does not have: {unused[:5]}"
        )
    for prefix, module in added:
        own = {k[len(prefix) + 1 :]: v for k, v in quant_state.items() if k.startswith(prefix + ".")}
        module.load_state_dict(own, strict=True)


def quantizer_state(pl_module: torch.nn.Module) -> dict[str, Any]:
    """Every quantizer's state as a flat ``{state-dict key: tensor}`` mapping."""
    keys = _quantizer_keys(pl_module)
    return {k: v for k, v in pl_module.state_dict().items() if k in keys}
