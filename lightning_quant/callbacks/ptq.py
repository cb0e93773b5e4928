"""Post-training quantization as a Lightning callback: calibrate (and reconstruct) before evaluation."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_quant.callbacks.base import (
    RecipeCallback,
    _quantizers,
    batch_head,
    batch_size,
    default_forward,
    load_quantizer_state,
    quantizer_state,
)
from lightning_quant.callbacks.diagnostics import log_metrics, sqnr_db, weight_metrics
from lightning_quant.callbacks.guards import algorithm_takes
from lightning_quant.nn import QuantizationReport
from lightning_quant.ptq import (
    ALGORITHMS,
    BlockOptions,
    ProgressReport,
    calibrate,
    finalize,
    find_causal_lm,
    generate_calibration_data,
    quant_state,
    set_modes,
)
from lightning_quant.quantizers import ObserverQuantizer
from lightning_quant.recipes import Recipe, override_list


def progress_label(algorithm: str, stage: str) -> str:
    """The reconstruction progress bar's title: the algorithm, and its stage where that says more."""
    return f"lightning-quant {algorithm}" if stage == algorithm else f"lightning-quant {algorithm} {stage}"


class PostTrainingQuantization(RecipeCallback):
    """Quantize a trained LightningModule after training: calibrate ranges, then optionally reconstruct.

    Runs once, before the first validate/test/predict loop (or at the end of ``fit`` with
    ``at_fit_end=True``): ``num_samples`` calibration samples are drawn with a fixed seed from the
    datamodule's train (or val) dataloader, ranges are calibrated with the recipe's observers, and the
    recipe's ``ptq.algorithm`` (AdaRound, BRECQ, QDrop, Bit-Split) reconstructs the model unit by unit,
    with a progress bar. The evaluation that follows runs quantized; output SQNR and top-1 agreement
    against the float model on the same batches are logged next to your own metrics. A checkpoint saved
    afterwards restores the calibrated model without calibrating again. Example::

        trainer = L.Trainer(callbacks=[PostTrainingQuantization("qdrop_w2a4", iters=2000)])
        trainer.validate(model, datamodule=dm)

    Under DDP, calibration statistics are merged across ranks (global min/max, summed histograms) and
    reconstruction runs on rank 0 on its share of the calibration data, then its result is broadcast.

    Args:
        recipe: shipped recipe name, path to a YAML recipe, or a dict/``DictConfig`` (kind ``ptq``, or a
            QAT recipe whose quantizers are all ``observer``: calibration only).
        overrides: ``"key.path=value"`` strings (or one such string) applied on top of the recipe.
        weight_bits / activation_bits: shortcuts for ``weights.bits`` / ``activations.bits``.
        num_samples / iters / seed: shortcuts for ``ptq.num_samples`` / ``ptq.iters`` (if it iterates) / ``ptq.seed``.
        calibration_dataloader: ``"train"`` or ``"val"`` (the datamodule's), ``"generated"`` (token sequences
            written by the model's own causal LM, fed as ``input_ids``/``attention_mask`` keyword arguments),
            ``"auto"`` (generated when the model holds a causal LM, else train), or any iterable of batches.
        at_fit_end: also quantize when ``fit`` ends (validation inside ``fit`` always runs in float).
        compare_float: log output SQNR and top-1 agreement against the float model during evaluation.
        export_path / export_format: write the quantized model there once it is calibrated (format from the
            suffix: .onnx, .pt2 for the PyTorch int8 program, .packed for binary weights).
    """

    kinds = ("ptq", "qat")

    def __init__(
        self,
        recipe: Union[str, dict, DictConfig, Recipe] = "minmax_w8a8",
        overrides: Union[str, list[str], None] = None,
        weight_bits: Optional[int] = None,
        activation_bits: Optional[int] = None,
        num_samples: Optional[int] = None,
        iters: Optional[int] = None,
        seed: Optional[int] = None,
        calibration_dataloader: Union[str, Iterable, None] = None,
        at_fit_end: bool = False,
        compare_float: bool = True,
        export_path: Optional[str] = None,
        export_format: Optional[str] = None,
    ) -> None:
        extra = override_list(overrides)  # one string is one override
        for key, value in (("num_samples", num_samples), ("iters", iters), ("seed", seed)):
            if value is not None and (key != "iters" or algorithm_takes(recipe, extra, key)):
                extra.append(f"ptq.{key}={value}")
        if isinstance(calibration_dataloader, str):
            extra.append(f"ptq.dataloader={calibration_dataloader}")
        super().__init__(recipe, extra, weight_bits, activation_bits, export_path, export_format)
        self.calibration_data = None if isinstance(calibration_dataloader, str) else calibration_dataloader
        self.at_fit_end = at_fit_end
        self.compare_float = compare_float

    @override
    def reset_run_state(self) -> None:
        super().reset_run_state()
        self.calibrated = False
        self.calibration_source = ""  # where the last calibration data came from: generated, train, val, given
        self.timings: dict[str, float] = {}
        self.curves: dict[str, list[float]] = {}
        handle = getattr(self, "_compare_handle", None)
        if handle is not None:
            handle.remove()
        self._compare_handle: Any = None
        self._agreement: list[tuple[float, float]] = []
        self.last_comparison: dict[str, float] = {}  # output SQNR and top-1 agreement of the last evaluation

    @override
    def label_methods(self, report: QuantizationReport) -> None:
        """A reconstruction algorithm (GPTQ, AdaRound, ...) sets the weights; the observers only start its grid."""
        algorithm = self.recipe.ptq.algorithm
        if algorithm == "none":
            return
        acts = self.recipe.activations
        act_label = (acts.options.observer if acts.method == "observer" else acts.method) if acts.enabled else ""
        for row in report.quantized:
            if row.weight_bits is not None:
                row.method = f"{algorithm}/{act_label}" if act_label and row.activation_bits is not None else algorithm

    def check_recipe(self, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        if recipe.kind == "qat":
            bad = [
                k
                for k, c in (("weights", recipe.weights), ("activations", recipe.activations))
                if c.method != "observer"
            ]
            if bad:
                raise MisconfigurationException(
                    f"{recipe.source}: {bad[0]}.method={getattr(recipe, bad[0]).method!r} is learned during "
                    "training; PostTrainingQuantization takes kind: ptq recipes or observer-only QAT recipes"
                )

    # -- set-up ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.begin_setup(trainer, pl_module)
        options = self.recipe.ptq.options
        blocks = options.blocks if isinstance(options, BlockOptions) else None
        if blocks is not None:
            try:
                pl_module.get_submodule(blocks)
            except AttributeError as err:
                raise MisconfigurationException(
                    f"{self.recipe.source}: ptq.blocks={blocks!r}: {type(pl_module).__name__} has no such module; "
                    "name the module whose children are the blocks (e.g. 'model.encoder.layer')"
                ) from err
        wants_lm = self.recipe.ptq.dataloader == "generated" and self.calibration_data is None
        if wants_lm and find_causal_lm(pl_module) is None:
            raise MisconfigurationException(
                f"{self.recipe.source}: ptq.dataloader='generated' needs a causal language model (a Hugging Face "
                f"model that can generate) inside {type(pl_module).__name__}; none was found. Use 'train', 'val' "
                "or pass calibration_dataloader=..."
            )
        self.prepare(pl_module)
        if not self.calibrated:
            set_modes(pl_module, fake_quant=False)  # float until calibrated

    def _set_active(self, pl_module: pl.LightningModule, active: bool) -> None:
        set_modes(pl_module, fake_quant=active, observe=False)

    # -- the post-training run -----------------------------------------------------------------------------
    def _generated_batches(self, pl_module: pl.LightningModule) -> Optional[list[Any]]:
        """Calibration data written by the model itself, when the recipe asks for it and the model can."""
        ptq = self.recipe.ptq
        lm = find_causal_lm(pl_module) if ptq.dataloader in ("generated", "auto") else None
        if self.calibration_data is not None or lm is None:
            if ptq.dataloader == "auto" and self.calibration_data is None:
                rank_zero_info("lightning-quant: no causal language model found; calibrating on the train dataloader")
            return None
        rank_zero_info(
            f"lightning-quant: generating {ptq.num_samples} calibration samples of {ptq.generate_length} tokens with "
            f"{type(lm).__name__} (random first token, {ptq.generate_greedy} greedy, then sampled)"
        )
        was_training = lm.training
        lm.eval()
        try:
            return generate_calibration_data(
                lm, ptq.num_samples, ptq.generate_length, ptq.generate_greedy, ptq.seed, ptq.batch_size
            )
        finally:
            lm.train(was_training)

    def _calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        ptq = self.recipe.ptq
        generated = self._generated_batches(pl_module)
        if generated is not None:
            self.calibration_source = "generated"
            return generated
        source: Any = self.calibration_data
        self.calibration_source = "given"
        if source is None:
            self.calibration_source = "val" if ptq.dataloader == "val" else "train"
            datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
            holder = datamodule if datamodule is not None else pl_module
            name = "val_dataloader" if ptq.dataloader == "val" else "train_dataloader"
            try:
                source = getattr(holder, name)()
            except (AttributeError, NotImplementedError, MisconfigurationException) as err:
                raise MisconfigurationException(
                    f"lightning-quant: calibration needs data: {type(holder).__name__}.{name}() is not available "
                    f"({err}); pass calibration_dataloader=... to PostTrainingQuantization"
                ) from err
        batches: list[Any] = []
        seen = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ptq.seed)
            for batch in source:
                take = min(batch_size(batch), ptq.num_samples - seen)
                batches.append(move_data_to_device(batch_head(batch, take), pl_module.device))
                seen += take
                if seen >= ptq.num_samples:
                    break
        if not batches:
            raise MisconfigurationException("lightning-quant: the calibration dataloader yielded no batch")
        if seen < ptq.num_samples:
            rank_zero_warn(f"lightning-quant: calibrating on {seen} samples (ptq.num_samples={ptq.num_samples})")
        return batches

    def _run_batch(self, pl_module: pl.LightningModule) -> Any:
        custom = getattr(pl_module, "calibration_forward", None)
        if callable(custom):
            return custom
        return lambda batch: default_forward(pl_module, batch)

    def quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate and reconstruct now (normally called by the hooks; safe to call once by hand).

        Evaluation loops run under ``torch.inference_mode``; reconstruction needs gradients, so both are
        switched back on here.
        """
        with torch.inference_mode(False), torch.enable_grad():
            self._quantize(trainer, pl_module)

    def _quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = self._calibration_batches(trainer, pl_module)
        if self.export_path is not None:
            self.export_example(pl_module, batches[0])  # an input export cannot take is refused before the work
        run_batch = self._run_batch(pl_module)
        ptq = self.recipe.ptq
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        was_training = pl_module.training
        pl_module.eval()
        start = time.perf_counter()
        calibrate(
            pl_module, tqdm(batches, desc="lightning-quant: calibration", disable=not show, leave=False), run_batch
        )
        if trainer.world_size > 1:
            for q in _quantizers(pl_module):
                if isinstance(q, ObserverQuantizer):
                    q.observer.sync()
        finalize(pl_module)
        for name, module in pl_module.named_modules():
            cut = getattr(getattr(module, "observer", None), "clipped_fraction", 0.0)
            if cut > 0.01:
                rank_zero_warn(
                    f"lightning-quant: KL calibration of '{name}' clips {100 * cut:.1f}% of the calibration values "
                    "(saturated data); consider activations.observer=mse or percentile"
                )
        if trainer.world_size > 1:  # searches (MSE, KL) ran on each rank's own samples: rank 0's result wins
            self._broadcast_state(trainer, pl_module)
        self.timings["calibration_s"] = time.perf_counter() - start
        self._set_active(pl_module, True)

        start = time.perf_counter()
        if ptq.algorithm != "none":
            if trainer.is_global_zero:
                bar = tqdm(disable=not show, desc="lightning-quant", leave=False)

                def progress(step: ProgressReport) -> None:
                    bar.set_description(
                        f"{progress_label(ptq.algorithm, step.stage)}: {step.index + 1}/{step.total} {step.unit}"
                    )
                    bar.total = step.iterations
                    bar.n = step.iteration
                    bar.set_postfix(loss=f"{step.loss:.4g}", refresh=True)

                self.curves = ALGORITHMS[ptq.algorithm].handler(pl_module, batches, run_batch, ptq, progress)
                bar.close()
            if trainer.world_size > 1:
                self._broadcast_state(trainer, pl_module)
        self.timings["reconstruction_s"] = time.perf_counter() - start
        self._set_active(pl_module, True)
        pl_module.train(was_training)
        self.calibrated = True
        self._log_results(trainer, pl_module, batches)
        self.export_model(trainer, pl_module, batches[0])

    @staticmethod
    def _broadcast_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give every rank rank 0's quantizer state (codes included)."""
        state = trainer.strategy.broadcast(quantizer_state(pl_module) if trainer.is_global_zero else None, src=0)
        assert state is not None  # rank 0's state, now on every rank
        load_quantizer_state(pl_module, {k: v.to(pl_module.device) for k, v in state.items()})

    def _log_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> None:
        metrics: dict[str, float] = {f"ptq/{k}": v for k, v in self.timings.items()}
        metrics.update(weight_metrics(pl_module))
        run_batch = self._run_batch(pl_module)
        sample = batch_head(batches[0], 1)  # one sample, as example_input_array usually is
        forward = None if getattr(pl_module, "example_input_array", None) is not None else lambda: run_batch(sample)
        metrics.update(self.summarize(trainer, pl_module, forward).metrics())
        log_metrics(trainer, metrics)
        for unit, curve in self.curves.items():
            for i, loss in enumerate(curve):
                log_metrics(trainer, {f"ptq_loss/{unit}": loss}, step=i)
        rank_zero_info(
            f"lightning-quant: {self.recipe.name} calibrated on {sum(batch_size(b) for b in batches)} samples in "
            f"{self.timings['calibration_s']:.1f}s, reconstruction ({self.recipe.ptq.algorithm}) "
            f"{self.timings['reconstruction_s']:.1f}s"
        )

    # -- hooks -------------------------------------------------------------------------------------------
    def _start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._set_active(pl_module, self.calibrated)  # validation during fit runs in float
            return
        if not self.calibrated:
            self.quantize(trainer, pl_module)
        self._set_active(pl_module, True)
        if self.compare_float and self._compare_handle is None:
            self._agreement = []
            self._compare_handle = pl_module.register_forward_hook(self._compare, with_kwargs=True)

    def _compare(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook during evaluation: run the same input in float and compare the outputs."""
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return
        handle, self._compare_handle = self._compare_handle, None
        handle.remove()  # the float pass must not call this hook again
        try:
            with quant_state(module, fake_quant=False), torch.no_grad():
                ref = module(*args, **kwargs)
        finally:
            self._compare_handle = module.register_forward_hook(self._compare, with_kwargs=True)
        agree = float((ref.argmax(-1) == output.argmax(-1)).float().mean()) if output.dim() >= 2 else float("nan")
        self._agreement.append((sqnr_db(ref.detach(), output.detach()), agree))

    def _end_evaluation(self, trainer: pl.Trainer, prefix: str) -> None:
        if self._compare_handle is not None:
            self._compare_handle.remove()
            self._compare_handle = None
        if self._agreement and trainer.state.fn != "fit":
            sq = torch.tensor([a for a, _ in self._agreement])
            ag = torch.tensor([b for _, b in self._agreement])
            log_metrics(
                trainer,
                {f"{prefix}/output_sqnr_db": float(sq.mean()), f"{prefix}/top1_agreement": float(ag.nanmean())},
            )
            self.last_comparison = {"output_sqnr_db": float(sq.mean()), "top1_agreement": float(ag.nanmean())}
        self._agreement = []

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_evaluation(trainer, "ptq_val")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_evaluation(trainer, "ptq_test")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_evaluation(trainer, "ptq_predict")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_active(pl_module, self.calibrated)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end and not self.calibrated:
            self.quantize(trainer, pl_module)

    # -- checkpoints -------------------------------------------------------------------------------------
    def extra_checkpoint_state(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated, "timings": dict(self.timings)}

    def load_extra_checkpoint_state(self, saved: dict[str, Any]) -> None:
        self.calibrated = bool(saved.get("calibrated", False))
        self.timings = dict(saved.get("timings", {}))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.recipe.fingerprint(),
            "recipe": self.recipe.to_yaml(),
            "calibrated": self.calibrated,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_fingerprint(state_dict.get("fingerprint"), state_dict.get("recipe", ""))
