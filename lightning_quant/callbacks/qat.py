"""Quantization-aware training as a Lightning callback: any LightningModule, no change to its code."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig
from typing_extensions import override

from lightning_quant.callbacks.base import RecipeCallback, _quantizers, batch_head, default_forward
from lightning_quant.callbacks.diagnostics import ActivationRecorder, log_metrics, log_plots, weight_metrics
from lightning_quant.nn import quantized_layers, set_bn_frozen
from lightning_quant.quantizers import ObserverQuantizer
from lightning_quant.quantizers.modes import set_modes
from lightning_quant.recipes import Recipe


class QuantizationAwareTraining(RecipeCallback):
    """Fake-quantize a LightningModule's layers during training, as a recipe says.

    The layers are swapped in ``setup()`` (before checkpoint restore and ``configure_optimizers``), so
    learned step sizes reach the optimizer and ``ckpt_path=`` resumes exactly. Checkpoints keep the
    float model's keys in ``state_dict`` (so ``YourModule.load_from_checkpoint`` works) and the quantizer
    state under ``checkpoint["lightning_quant"]``, which this callback restores. Example::

        trainer = L.Trainer(callbacks=[QuantizationAwareTraining("lsq_w4a4")])
        trainer.fit(model, datamodule=dm)

    Args:
        recipe: shipped recipe name, path to a YAML recipe, or a dict/``DictConfig``.
        overrides: ``"key.path=value"`` strings (or one such string) applied on top of the recipe.
        weight_bits: shortcut for ``weights.bits=...``.
        activation_bits: shortcut for ``activations.bits=...``.
        export_path: write the quantized model there when ``fit`` ends (format from the suffix: .onnx,
            .pt2 for the PyTorch int8 program, .packed for binary weights; or ``export_format``).
    """

    kinds = ("qat",)

    def __init__(
        self,
        recipe: Union[str, dict, DictConfig, Recipe] = "lsq_w8a8",
        overrides: Union[str, list[str], None] = None,
        weight_bits: Optional[int] = None,
        activation_bits: Optional[int] = None,
        export_path: Optional[str] = None,
        export_format: Optional[str] = None,
    ) -> None:
        super().__init__(recipe, overrides, weight_bits, activation_bits, export_path, export_format)

    @override
    def reset_run_state(self) -> None:
        super().reset_run_state()
        self.quant_steps = 0  # training steps taken with quantization on
        self._active = False
        self._warned_uninitialized = False
        self._uninitialized = False
        self._recorder: Optional[ActivationRecorder] = None
        self._val_recorder: Optional[ActivationRecorder] = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_path is not None:
            self._set_flags(pl_module, enabled=True, observing=False)
            self.export_model(trainer, pl_module)

    # -- model preparation -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.begin_setup(trainer, pl_module)
        self.prepare(pl_module)
        # Quantizers stay off until the first training batch (fit) or the evaluation loop starts, so that
        # sanity checks and example-input forwards (model summaries) do not initialise ranges from dummy data.
        self._set_flags(pl_module, enabled=False, observing=False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "example_input_array", None) is None:
            self._summary_pending = True  # MACs/BOPs are measured on the first training batch instead
            return
        self._log_summary(trainer, pl_module)

    def _log_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any = None) -> None:
        forward = None
        if batch is not None:
            custom = getattr(pl_module, "calibration_forward", None)
            sample = batch_head(batch, 1)  # one sample, as example_input_array usually is
            forward = (lambda: custom(sample)) if callable(custom) else (lambda: default_forward(pl_module, sample))
        summary = self.summarize(trainer, pl_module, forward)
        if self.recipe.diagnostics.summary:
            rank_zero_info(f"lightning-quant: bit-aware summary\n{summary.table()}")
        log_metrics(trainer, summary.metrics())

    # -- schedules ---------------------------------------------------------------------------------------
    def _apply_schedule(self, trainer: pl.Trainer, training: bool) -> None:
        sch = self.recipe.schedule
        if training:
            self._active = trainer.current_epoch >= sch.start_epoch and trainer.global_step >= sch.start_step
        else:
            self._active = True  # evaluation of a QAT model always quantizes
        observing = self._active and (sch.observer_steps is None or self.quant_steps < sch.observer_steps)
        model = trainer.lightning_module
        self._set_flags(model, self._active, observing)
        if sch.freeze_bn_epoch is not None and training:
            set_bn_frozen(model, trainer.current_epoch >= sch.freeze_bn_epoch)

    @staticmethod
    def _set_flags(model: torch.nn.Module, enabled: bool, observing: bool) -> None:
        set_modes(model, fake_quant=enabled, observe=observing)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.export_path is not None and self._example is None:
            self.export_example(pl_module, batch)  # kept for on_fit_end; a non-tensor input is refused now
        if self._summary_pending:
            self._summary_pending = False
            self._log_summary(trainer, pl_module, batch)
        self._apply_schedule(trainer, training=True)
        self._uninitialized = any(not q._initialized for q in _quantizers(pl_module) if q.fake_quant_enabled)
        every = self.recipe.diagnostics.every_n_steps
        self._recorder = ActivationRecorder(pl_module) if every and trainer.global_step % every == 0 else None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._active:
            self.quant_steps += 1
            if trainer.world_size > 1:
                self._sync(pl_module)
        if self._recorder is not None:
            metrics = self._recorder.remove()
            if self._active:
                log_metrics(trainer, {**weight_metrics(pl_module), **metrics})
            self._recorder = None

    def _sync(self, model: torch.nn.Module) -> None:
        """Make quantizer state bitwise identical across DDP ranks.

        Observers are merged first (global min/max, averaged estimates) while they observe, and learned
        quantizers are averaged on the step they were initialised from each rank's data. Then all float
        quantizer state is broadcast from rank 0 as one flat tensor (a single collective), because
        per-rank floating-point rounding would otherwise let learned steps drift apart by an ulp.
        """
        quantizers = _quantizers(model)
        for q in quantizers:
            if (isinstance(q, ObserverQuantizer) and q.observer_enabled) or self._uninitialized:
                q.sync()
        tensors = [t for q in quantizers for t in (*q.parameters(), *q.buffers()) if t.is_floating_point()]
        if tensors:
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            torch.distributed.broadcast(flat, src=0)
            with torch.no_grad():  # copy back in place: parameters stay the objects the optimizer holds
                for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                    t.copy_(part.view_as(t))

    # -- evaluation --------------------------------------------------------------------------------------
    def _start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            return  # validation inside fit follows the training schedule
        self._apply_schedule(trainer, training=False)
        if self._warned_uninitialized:
            return
        fresh = [
            name
            for name, layer in quantized_layers(pl_module)
            for q in (layer.weight_quantizer, *layer.activation_quantizers())
            if q is not None and not q._initialized
        ]
        if fresh:
            self._warned_uninitialized = True
            rank_zero_warn(
                f"lightning-quant: {len(fresh)} quantizers (e.g. in '{fresh[0]}') hold no trained state, so their "
                "ranges will be set from the first evaluation batch. To evaluate a QAT checkpoint pass "
                "ckpt_path=... to validate/test/predict so the learned scales are restored."
            )

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._val_recorder = ActivationRecorder(pl_module) if batch_idx == 0 and dataloader_idx == 0 else None

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        recorder = self._val_recorder
        if recorder is None:
            return
        self._val_recorder = None
        metrics = recorder.remove()
        if trainer.sanity_checking or not self._active:
            return
        metrics = {**weight_metrics(pl_module), **metrics}
        log_metrics(trainer, {k.replace("quant/", "quant_val/", 1): v for k, v in metrics.items()})
        if self.recipe.diagnostics.plots:
            log_plots(trainer, metrics, pl_module)

    # -- checkpoints -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.recipe.fingerprint(),
            "recipe": self.recipe.to_yaml(),
            "quant_steps": self.quant_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_fingerprint(state_dict.get("fingerprint"), state_dict.get("recipe", ""))
        self.quant_steps = int(state_dict.get("quant_steps", 0))
