"""Binarization as a Lightning callback: binary/ternary training of any LightningModule from a recipe."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_quant.callbacks.base import _quantizers
from lightning_quant.callbacks.diagnostics import log_metrics
from lightning_quant.callbacks.qat import QuantizationAwareTraining
from lightning_quant.nn import QuantizedLayer, quantized_layers, summarize
from lightning_quant.nn.modules import swap_class
from lightning_quant.quantizers.binary import BinaryQuantizer, RPReLU, RSignQuantizer, apply_rprelu
from lightning_quant.recipes import Recipe


def _channels_out(layer: torch.nn.Module) -> int:
    return int(getattr(layer, "out_channels", getattr(layer, "out_features", 1)))


class SignInputWatch:
    """Forward pre-hooks on binary activation quantizers during the first training batches: which layers never
    see a negative input. ``sign`` of such an input is +1 everywhere (a ReLU before it, often an ``F.relu`` in
    ``forward()`` that the callback cannot replace), so the layer passes no information and training fails."""

    batches = 2

    def __init__(self, model: torch.nn.Module) -> None:
        self.negative: dict[str, bool] = {}
        self.seen: set[str] = set()
        self._handles: list[RemovableHandle] = []
        for name, layer in quantized_layers(model):
            q = layer.input_quantizer
            if isinstance(q, BinaryQuantizer):
                self.negative[name] = False
                self._handles.append(q.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def record(q: torch.nn.Module, args: tuple) -> None:
            if q.training and not self.negative[name] and isinstance(args[0], torch.Tensor):
                self.seen.add(name)
                self.negative[name] = bool((args[0].detach() < 0).any())

        return record

    def finish(self) -> list[str]:
        """Remove the hooks; the layers whose binary-activation input was never negative."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return [name for name, negative in self.negative.items() if name in self.seen and not negative]


class Binarization(QuantizationAwareTraining):
    """Train a LightningModule with binary (or ternary) layers, as a recipe says.

    Layers are swapped in ``setup()`` like the QAT callback (first and last layer stay in float by
    default), so checkpoints, resume, DDP and logging behave the same. On top of that: latent weights are
    clipped to [−1, 1] after each step for BinaryConnect/BNN; with binary activations, ReLU modules become
    identities (a sign of a ReLU output is constant); annealed estimators (IR-Net) follow the
    training progress; ReActNet recipes (``activations.method: rsign``) get an RPReLU after each binary
    layer; and every epoch logs the weight sign-flip rate, the fraction of binary operations and the packed
    model size against float. Example::

        trainer = L.Trainer(callbacks=[Binarization("irnet")])
        trainer.fit(model, datamodule=dm)
    """

    kinds = ("binary",)

    def __init__(
        self,
        recipe: Union[str, dict, DictConfig, Recipe] = "bnn",
        overrides: Union[str, list[str], None] = None,
        export_path: Optional[str] = None,
        export_format: Optional[str] = None,
    ) -> None:
        super().__init__(recipe, overrides, export_path=export_path, export_format=export_format)
        self._signs: dict[str, torch.Tensor] = {}
        self._watch: Optional[SignInputWatch] = None

    @staticmethod
    def _binary_layers(model: torch.nn.Module) -> list[tuple[str, QuantizedLayer]]:
        return [(n, m) for n, m in quantized_layers(model) if isinstance(m.weight_quantizer, BinaryQuantizer)]

    @override
    def prepare(self, pl_module: pl.LightningModule) -> bool:
        """Swap the layers, then what binary activations need around them: ReLU modules become identities and
        ReActNet layers get their RPReLU. Here rather than in ``setup`` so that every path that rebuilds the model
        from a checkpoint (the CLI's export) builds the same model as training did."""
        already = super().prepare(pl_module)
        if self.recipe.activations.enabled:
            self._remove_relus(pl_module)
        for _, layer in quantized_layers(pl_module):
            if isinstance(layer.input_quantizer, RSignQuantizer) and not hasattr(layer, "rprelu"):
                layer.rprelu = RPReLU(_channels_out(layer)).to(layer.weight.device)
                layer.register_forward_hook(apply_rprelu)
        return already

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.recipe.activations.enabled:
            self._finish_watch()
            self._watch = SignInputWatch(pl_module)

    def _finish_watch(self) -> None:
        """Warn about binary-activation layers whose input was never negative in the first training batches."""
        if self._watch is None:
            return
        constant = self._watch.finish()
        self._watch = None
        if constant:
            rank_zero_warn(
                f"lightning-quant: binary activations: the input of {', '.join(repr(n) for n in constant)} was never "
                f"negative in the first {SignInputWatch.batches} training batches, so sign() is +1 everywhere and "
                "the layer learns nothing (accuracy stays at chance). Something like a ReLU feeds it: an F.relu / "
                "torch.relu call in forward() cannot be removed by the callback. Remove it for binary layers (BN -> "
                "sign -> conv, as BNN and XNOR-Net do) or use nn.ReLU modules, which the callback makes identities."
            )

    @staticmethod
    def _remove_relus(pl_module: pl.LightningModule) -> None:
        """Binary activations need signed inputs: ``sign`` of a ReLU output is +1 everywhere. As in BNN and
        XNOR-Net (BN → sign → conv), ReLU modules become identities; ``F.relu`` calls in ``forward`` cannot
        be seen here and are reported so the user can remove them."""
        replaced = [n for n, m in pl_module.named_modules() if type(m) in (torch.nn.ReLU, torch.nn.ReLU6)]
        for name in replaced:
            swap_class(pl_module.get_submodule(name), torch.nn.Identity)
        if replaced:
            rank_zero_info(
                f"lightning-quant: binary activations: {len(replaced)} ReLU modules replaced by identity "
                f"({', '.join(replaced[:4])}{', ...' if len(replaced) > 4 else ''}); functional relu calls in "
                "forward() are not visible to the callback and should be removed for binary activations"
            )

    def _set_progress(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = max(1, int(trainer.estimated_stepping_batches))
        progress = min(1.0, trainer.global_step / total)
        for q in _quantizers(pl_module):
            if isinstance(q, BinaryQuantizer):
                q.progress = progress

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._set_progress(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx + 1 >= SignInputWatch.batches:
            self._finish_watch()
        with torch.no_grad():
            for _, layer in self._binary_layers(pl_module):
                if isinstance(layer.weight_quantizer, BinaryQuantizer) and type(layer.weight_quantizer).clip_latent:
                    layer.weight.clamp_(-1.0, 1.0)  # BinaryConnect/BNN keep latent weights in [-1, 1]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_watch()  # runs shorter than the watch: report what was seen, and leave no hook behind

    def _weight_signs(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {
                n: torch.sign(layer.quantized_weight()).to(torch.int8) for n, layer in self._binary_layers(pl_module)
            }

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._signs = self._weight_signs(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = self._weight_signs(pl_module)
        metrics: dict[str, float] = {}
        flipped = total = 0
        for name, signs in now.items():
            before = self._signs.get(name)
            if before is None or before.shape != signs.shape:
                continue
            changed = int((before != signs).sum())
            metrics[f"binary/{name}/sign_flip_rate"] = changed / signs.numel()
            flipped += changed
            total += signs.numel()
        if total:
            metrics["binary/sign_flip_rate"] = flipped / total
        metrics.update(self.binary_metrics(pl_module))
        log_metrics(trainer, metrics)
        self.last_epoch_metrics = metrics

    def binary_metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Fraction of MACs done by 1-bit x 1-bit layers, and packed size against float."""
        summary = summarize(pl_module, getattr(pl_module, "example_input_array", None))
        total = sum(r.macs for r in summary.layers)
        binary = sum(r.macs for r in summary.layers if r.weight_bits == 1 and r.activation_bits == 1)
        metrics = {"binary/fraction_binary_ops": binary / total} if total else {}  # MACs need example_input_array
        return {
            **metrics,
            "binary/packed_size_mb": summary.size_mb,
            "binary/float_size_mb": summary.float_memory_bits / 8 / 1e6,
            "binary/compression": summary.float_memory_bits / max(summary.memory_bits, 1),
        }
