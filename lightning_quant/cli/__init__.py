"""The ``lightning-quant`` command: run a recipe end to end and print a result table.

``lightning-quant fit --recipe lsq_w4a4`` trains (or loads from the cache) a float baseline on the
embedded default (scikit-learn digits and a small CNN), fine-tunes it under the recipe, tests both and
prints float vs quantized accuracy, size and wall time. ``lightning-quant recipes`` lists the recipes.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from lightning_quant import __version__
from lightning_quant.callbacks import (
    Binarization,
    IncrementalQuantization,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_quant.callbacks.base import load_quantizer_state
from lightning_quant.cli.loading import baseline_key, import_object, load_tensors, stored_recipe
from lightning_quant.examples import DigitsDataModule, ImageClassifier
from lightning_quant.export import ExportError, export, format_for
from lightning_quant.nn import summarize
from lightning_quant.nn.surgery import format_table
from lightning_quant.recipes import Recipe, RecipeError, describe_recipes, load_recipe, recipe_methods
from lightning_quant.recipes.safe_yaml import parse_yaml

_LOGGERS = ("csv", "tensorboard", "wandb")


def _default_cache() -> Path:
    return Path(os.environ.get("LIGHTNING_QUANT_CACHE", Path.home() / ".cache" / "lightning_quant"))


def _make_logger(kind: str, save_dir: Path, name: str) -> Logger:
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir, name=name)
    if kind == "wandb":
        return WandbLogger(
            name=name,
            save_dir=str(save_dir),
            project="lightning-quant",
            offline=os.environ.get("WANDB_MODE") == "offline",
        )
    return CSVLogger(save_dir, name=name)


def _accuracy(results: Sequence[Mapping[str, float]]) -> Optional[float]:
    for key, value in (results[0] if results else {}).items():
        if "acc" in key:
            return float(value)
    return None


def _trainer(epochs: int, logger: Any, callbacks: list[Any], root: Path) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(root),
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=5,
        accelerator="auto",
        devices=1,
    )


def callback_for(recipe: Recipe) -> pl.Callback:
    """The callback that runs a recipe of this kind."""
    kinds = {
        "qat": QuantizationAwareTraining,
        "ptq": PostTrainingQuantization,
        "binary": Binarization,
        "inq": IncrementalQuantization,
    }
    return kinds[recipe.kind](recipe)


def run_fit(args: argparse.Namespace) -> dict[str, Any]:
    """The main job: float baseline, then the recipe, then checkpoint/export; returns the numbers it prints."""
    recipe, export_format = _fit_recipe(args)
    pl.seed_everything(args.seed, workers=True)
    datamodule = (
        import_object(args.data, "data")() if args.data else DigitsDataModule(batch_size=recipe.training.batch_size)
    )
    user_model = args.model is not None
    model: pl.LightningModule = (
        import_object(args.model, "model")()
        if user_model
        else ImageClassifier(optimizer="adam", lr=0.01, epochs=args.float_epochs)
    )
    out_dir = Path(args.output_dir)

    # 1. float baseline, cached by model source and structure, seed and epochs
    float_time = _float_baseline(args, model, datamodule, out_dir)
    float_acc = _accuracy(_trainer(1, False, [], out_dir).test(model, datamodule=datamodule, verbose=False))
    float_summary = summarize(model)  # counts only: no forward, nothing changed

    # 2. quantization-aware fine-tuning (kind: qat) or post-training quantization (kind: ptq) under the recipe
    logger = _make_logger(args.logger, out_dir, recipe.name)
    trainer, quant_acc, qat_time = _quantize(recipe, model, datamodule, logger, out_dir, set_hparams=not user_model)
    quant_summary = summarize(model)
    _save_quantized(args, recipe, trainer, model, datamodule, export_format)
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()  # flush the run (offline runs are then ready for `wandb sync`)
    result = {
        "recipe": recipe.name,
        "float_acc": float_acc,
        "quant_acc": quant_acc,
        "float_mb": float_summary.size_mb,
        "quant_mb": quant_summary.size_mb,
        "compression": float_summary.memory_bits / max(quant_summary.memory_bits, 1),
        "float_time": float_time,
        "qat_time": f"{qat_time:.1f} s",
        "log_dir": getattr(logger, "log_dir", None) or str(out_dir),
    }
    _print_result(result, recipe)
    return result


def _fit_recipe(args: argparse.Namespace) -> tuple[Recipe, Optional[str]]:
    """The recipe with its ``--set``/``--epochs`` overrides, and the export format; checked before any training."""
    overrides = list(args.set or [])
    if args.epochs is not None:
        overrides.append(f"training.epochs={args.epochs}")
    try:
        recipe: Recipe = load_recipe(args.recipe, overrides)
        export_format = format_for(args.export, args.format) if args.export else None
    except (RecipeError, ExportError) as err:
        raise SystemExit(f"error: {err}") from err
    if args.int4_weights and export_format != "onnx":
        raise SystemExit("error: --int4-weights needs an ONNX export (--export F.onnx)")
    return recipe, export_format


def _float_baseline(args: argparse.Namespace, model: pl.LightningModule, datamodule: Any, out_dir: Path) -> str:
    """Load the float baseline from the cache, or train it and cache it; returns its wall time (or "cached")."""
    key = baseline_key(model, datamodule)
    cache = (
        Path(args.cache_dir)
        / f"{type(model).__module__}.{type(model).__qualname__}-seed{args.seed}-e{args.float_epochs}-{key}.pt"
    )
    start = time.perf_counter()
    if cache.is_file() and not args.retrain:
        model.load_state_dict(load_tensors(cache, "cached float baseline"))
        print(
            f"float baseline reused from the cache: {cache} (same model source and structure, seed {args.seed}, "
            f"{args.float_epochs} epochs; --retrain trains it again)"
        )
        return "cached"
    print(f"training the float baseline ({args.float_epochs} epochs); it is cached as {cache}")
    _trainer(args.float_epochs, False, [], out_dir).fit(model, datamodule=datamodule)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(cache)  # atomic: a crash never leaves a half-written baseline
    return f"{time.perf_counter() - start:.1f} s"


def _quantize(
    recipe: Recipe,
    model: pl.LightningModule,
    datamodule: Any,
    logger: Logger,
    out_dir: Path,
    set_hparams: bool,
) -> tuple[pl.Trainer, Optional[float], float]:
    """Run the recipe's callback: calibrate and test (PTQ), or fine-tune then test; returns the trainer, the
    quantized accuracy and the seconds taken. ``set_hparams``: the demo model takes the recipe's optimizer."""
    start = time.perf_counter()
    callback = callback_for(recipe)
    if recipe.kind == "ptq":
        trainer = _trainer(1, logger, [callback], out_dir)
        quant_acc = _accuracy(trainer.test(model, datamodule=datamodule, verbose=False))  # calibrates first
        return trainer, quant_acc, time.perf_counter() - start
    tr = recipe.training
    if set_hparams:
        model.hparams.update(
            optimizer=tr.optimizer, lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay, epochs=tr.epochs
        )
    trainer = _trainer(tr.epochs, logger, [callback], out_dir)
    trainer.fit(model, datamodule=datamodule)
    qat_time = time.perf_counter() - start
    return trainer, _accuracy(trainer.test(model, datamodule=datamodule, verbose=False)), qat_time


def _save_quantized(
    args: argparse.Namespace,
    recipe: Recipe,
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: Any,
    export_format: Optional[str],
) -> None:
    """Write the quantized checkpoint (``--checkpoint``) and the export (``--export``) where asked."""
    if args.checkpoint:
        trainer.save_checkpoint(args.checkpoint)  # written to a temporary file first, then renamed
        print(f"quantized checkpoint: {args.checkpoint}")
    if args.export:
        example = next(iter(datamodule.test_dataloader()))[0][:1]
        try:
            path = export(model, example, args.export, export_format, args.int4_weights)
            print(f"exported: {path}")
        except ExportError as err:
            raise SystemExit(f"error: cannot export {recipe.name}: {err}") from err


def _fmt_acc(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _print_result(r: dict[str, Any], recipe: Recipe) -> None:
    head = ("", "float", f"quantized ({r['recipe']})")
    rows: list[tuple[str, ...]] = [
        ("test accuracy", _fmt_acc(r["float_acc"]), _fmt_acc(r["quant_acc"])),
        ("model size", f"{r['float_mb'] * 1e3:.1f} KB", f"{r['quant_mb'] * 1e3:.1f} KB"),
        ("compression", "1.00x", f"{r['compression']:.2f}x"),
        ("bits (W/A)", "32/32", f"{recipe.weights.bits}/{recipe.activations.bits}"),
        ("wall time", r["float_time"], r["qat_time"]),
    ]
    print("\n" + format_table(head, rows))
    print(f"\nlogs: {r['log_dir']}")


def _print_recipes(args: argparse.Namespace) -> None:
    if args.name is None:
        rows: list[tuple[str, ...]] = [(name, desc) for name, desc in describe_recipes().items()]
        print(format_table(("recipe", "description"), rows))
        return
    recipe = load_recipe(args.name)  # one recipe: its methods, the files that implement them, its resolved YAML
    print(f"{recipe.name}: {recipe.description}\n")
    print(format_table(("key", "method", "file"), recipe_methods(recipe)))
    print(f"\n{recipe.to_yaml()}", end="")


def _read_stored(args: argparse.Namespace, stored: str) -> Any:
    """A checkpoint's recipe text, read with the recipe loader's bounds (a checkpoint is a file from elsewhere)."""
    try:
        return parse_yaml(stored, f"{args.checkpoint}: stored recipe")
    except RecipeError as err:
        raise SystemExit(f"error: {err}") from None


def _export_recipe(args: argparse.Namespace, checkpoint: dict[str, Any]) -> Recipe:
    """``--recipe`` if given (it must match the checkpoint's), else the recipe stored in the checkpoint."""
    stored = stored_recipe(checkpoint)
    overrides = list(args.set or [])
    if args.recipe is None:
        if stored is None:
            raise SystemExit(f"error: {args.checkpoint} stores no recipe; name it with --recipe")
        data = _read_stored(args, stored)
        if not isinstance(data, dict):
            raise SystemExit(f"error: {args.checkpoint}: its stored recipe is not a mapping; name one with --recipe")
        data.pop("base", None)  # already merged in; its file may not be here
        return load_recipe(data, overrides)
    recipe = load_recipe(args.recipe, overrides)
    saved = checkpoint.get("lightning_quant")
    fingerprint = saved.get("fingerprint") if isinstance(saved, dict) else None
    if fingerprint is not None and fingerprint != recipe.fingerprint():
        data = _read_stored(args, stored) if stored else None
        name = data.get("name", "?") if isinstance(data, dict) else "?"
        raise SystemExit(
            f"error: {args.checkpoint} was quantized with recipe {name!r}, whose weights/activations/layers differ "
            f"from --recipe {args.recipe!r}; leave --recipe out to use the checkpoint's own"
        )
    return recipe


def run_export(args: argparse.Namespace) -> None:
    """Rebuild the quantized model from a checkpoint and its recipe (stored in it), then export it."""
    try:
        fmt = format_for(args.output, args.format)
    except ExportError as err:
        raise SystemExit(f"error: {err}") from err
    checkpoint = load_tensors(Path(args.checkpoint), "checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise SystemExit(f"error: {args.checkpoint} is not a Lightning checkpoint (it has no 'state_dict')")
    try:
        recipe = _export_recipe(args, checkpoint)
    except RecipeError as err:
        raise SystemExit(f"error: {err}") from err
    model: pl.LightningModule = import_object(args.model, "model")() if args.model else ImageClassifier()
    if recipe.kind == "inq":  # INQ trains the float layers onto its levels: nothing to rebuild, export finds them
        model.load_state_dict(checkpoint["state_dict"])
    else:
        saved = checkpoint.get("lightning_quant")
        if saved is None:
            raise SystemExit(f"error: {args.checkpoint} holds no lightning-quant state (save it after quantizing)")
        callback = callback_for(recipe)
        if not hasattr(callback, "prepare"):
            raise SystemExit(f"error: {recipe.name}: kind {recipe.kind!r} has no quantizers to export")
        callback.prepare(model)
        model.load_state_dict(checkpoint["state_dict"], strict=False)
        load_quantizer_state(model, saved["quantizer_state"])
    model.eval()
    example = torch.zeros(args.input_shape) if args.input_shape else getattr(model, "example_input_array", None)
    if example is None:
        raise SystemExit("error: give --input-shape (the model has no example_input_array)")
    try:
        print(f"exported {recipe.name} ({fmt}): {export(model, example, args.output, fmt, args.int4_weights)}")
    except ExportError as err:
        raise SystemExit(f"error: cannot export {recipe.name}: {err}") from err


_INT4_HELP = "ONNX: store weights of 4 bits and fewer as INT4 (half the size; onnxruntime runs those layers in float)"


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``lightning-quant`` command."""
    parser = argparse.ArgumentParser(prog="lightning-quant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lightning-quant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser(
        "fit",
        help="train float, fine-tune under a recipe, test both, print a table",
        description="Run a recipe end to end. Without --model/--data: digits and a small CNN.",
    )
    fit.add_argument("--recipe", default="lsq_w4a4", help="shipped recipe name or path to a YAML recipe")
    fit.add_argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="recipe overrides (repeatable), e.g. weights.bits=3",
    )
    fit.add_argument("--model", help="LightningModule class as 'pkg.module:Class' or 'file.py:Class' (no arguments)")
    fit.add_argument("--data", help="LightningDataModule class as 'pkg.module:Class' or 'file.py:Class'")
    fit.add_argument("--logger", choices=_LOGGERS, default="csv", help="experiment logger (wandb honours WANDB_MODE)")
    fit.add_argument("--epochs", type=int, help="quantized fine-tuning epochs (default: the recipe's)")
    fit.add_argument("--float-epochs", type=int, default=20, help="epochs of the float baseline")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--cache-dir", default=str(_default_cache()), help="where float baselines are cached")
    fit.add_argument("--retrain", action="store_true", help="ignore a cached float baseline")
    fit.add_argument("--output-dir", default="lightning_logs", help="logs go here")
    fit.add_argument("--checkpoint", help="save the quantized model as a Lightning checkpoint here")
    fit.add_argument("--export", help="export the quantized model here (.onnx, .pt2 or .packed)")
    fit.add_argument("--format", choices=["onnx", "torch", "packed"], help="export format (default: from the suffix)")
    fit.add_argument("--int4-weights", action="store_true", help=_INT4_HELP)
    fit.set_defaults(func=run_fit)
    exp = sub.add_parser(
        "export",
        help="export a quantized checkpoint to ONNX, a PyTorch int8 program or packed binary weights",
        description="Rebuild the quantized model from a checkpoint and the recipe it was made with, then export it.",
    )
    exp.add_argument("--checkpoint", required=True, help="Lightning checkpoint saved after quantization")
    exp.add_argument("--recipe", help="the recipe the checkpoint was quantized with (default: the one it stores)")
    exp.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="the same recipe overrides")
    exp.add_argument("--output", required=True, help="file to write (.onnx, .pt2 or .packed)")
    exp.add_argument("--format", choices=["onnx", "torch", "packed"], help="default: from the --output suffix")
    exp.add_argument("--int4-weights", action="store_true", help=_INT4_HELP)
    exp.add_argument("--model", help="LightningModule as 'pkg.module:Class' or 'file.py:Class' (default: digits demo)")
    exp.add_argument("--input-shape", type=int, nargs="+", help="example input shape (default: example_input_array)")
    exp.set_defaults(func=run_export)
    rec = sub.add_parser("recipes", help="list the shipped recipes", description="List the shipped recipes.")
    rec.add_argument("name", nargs="?", help="a recipe: show its methods, their source files and its resolved YAML")
    rec.set_defaults(func=_print_recipes)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    args.func(args)
