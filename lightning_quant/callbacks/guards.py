"""Checks the quantization callbacks run before any work, so a wrong set-up fails early and says what is wrong."""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_quant.ptq import ALGORITHMS
from lightning_quant.recipes import Recipe, RecipeError, load_recipe
from lightning_quant.recipes.safe_yaml import parse_yaml

# the recipe sections a checkpoint's quantizer state depends on (those in Recipe.fingerprint)
_SHAPING_SECTIONS = ("weights", "activations", "layers")
_EXPORTABLE_METHODS = ("observer", "lsq", "pact")  # uniform affine grids: QuantizeLinear / quantized_decomposed
_TERNARY_WEIGHTS = ("twn", "ttq")  # int8 codes {-1, 0, 1} with per-channel scales
_MAX_DIFF_NODES = 5000


def describe(callback: Callback) -> str:
    """``QuantizationAwareTraining('lsq_w4a4')``: a callback as a user would recognise it in an error."""
    recipe = getattr(callback, "recipe", None)
    return f"{type(callback).__name__}({recipe.name!r})" if recipe is not None else type(callback).__name__


def check_only_quantization_callback(trainer: pl.Trainer, callback: Callback) -> None:
    """Refuse a Trainer that holds ``callback`` and another lightning-quant callback: the second would be ignored
    (layers already swapped) or fight the first over the same quantizers."""
    # Trainer.callbacks is set by Lightning's CallbackConnector and not declared on the class
    found = trainer.callbacks  # type: ignore[attr-defined]
    others = [c for c in found if c is not callback and getattr(c, "quantizes_model", False)]
    if others:
        raise MisconfigurationException(
            f"lightning-quant: this Trainer holds two quantization callbacks, {describe(callback)} and "
            f"{describe(others[0])}; only one can own the model's quantizers. Keep one callback and express the "
            "rest of what you want in its recipe (overrides=[...], a derived recipe with `base:`)."
        )


def run_checkpoint_hook_after_writers(trainer: pl.Trainer, callback: Callback) -> None:
    """Call ``callback.on_save_checkpoint`` after other callbacks that also write the checkpoint.

    The callback moves the quantizer keys out of ``checkpoint["state_dict"]``; a callback called later that
    rebuilds ``state_dict`` from the module (``ModelPruning`` does, to make pruning permanent) would put them
    back, and the file would no longer load into the plain class. The callback list is replaced, not changed in
    place, because Lightning may be iterating it; checkpoint callbacks keep their place at the end.
    """
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
    mine = callbacks.index(callback)
    writers = [
        i
        for i, c in enumerate(callbacks)
        if i > mine and not isinstance(c, Checkpoint) and is_overridden("on_save_checkpoint", c, Callback)
    ]
    if writers:
        callbacks.insert(writers[-1] + 1, callback)
        del callbacks[mine]
        trainer.callbacks = callbacks  # type: ignore[attr-defined]


def check_export_target(recipe: Recipe, path: str, format: str) -> None:
    """Refuse an export the recipe cannot produce, at construction rather than after training."""
    where = f"{recipe.source}: export_path={path!r} (format {format!r})"
    if format == "packed":
        if recipe.kind != "binary":
            raise MisconfigurationException(
                f"{where}: packed export holds 1-bit weights; recipe kind {recipe.kind!r} has none. Use .onnx or .pt2"
            )
        return
    if format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise MisconfigurationException(f"{where} needs onnx: pip install 'lightning-quant[export]'")
    for key in ("weights", "activations"):
        cfg = getattr(recipe, key)
        allowed = _EXPORTABLE_METHODS + (_TERNARY_WEIGHTS if key == "weights" else ())
        if cfg.enabled and cfg.method not in allowed:
            hint = "export binary weights with a .packed path" if recipe.kind == "binary" else "use another method"
            raise MisconfigurationException(
                f"{where}: {key}.method={cfg.method!r} has no integer-grid export (exported: {list(allowed)}); {hint}"
            )
    if format == "torch" and recipe.weights.enabled and recipe.weights.granularity == "per_group":
        raise MisconfigurationException(
            f"{where}: weights.granularity='per_group' has no int8 kernel in PyTorch; use an .onnx path"
        )


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if len(out) > _MAX_DIFF_NODES:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def _read_saved(saved_yaml: str) -> Any:
    """The checkpoint's recipe text, read with the recipe loader's bounds (size, depth, alias expansion, duplicate
    keys): a checkpoint is a file from elsewhere. None where it cannot be read."""
    try:
        return parse_yaml(saved_yaml, "the checkpoint's stored recipe")
    except RecipeError:
        return None


def recipe_differences(saved_yaml: str, recipe: Recipe) -> list[str]:
    """``key: saved -> current`` for every setting that shapes the quantized model and differs."""
    saved = _read_saved(saved_yaml)
    if not isinstance(saved, dict):
        return ["(the checkpoint's recipe could not be read)"]
    current = yaml.safe_load(recipe.to_yaml())
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for section in _SHAPING_SECTIONS:
        _flatten(saved.get(section), section, old)
        _flatten(current.get(section), section, new)
    missing = "(absent)"
    return [
        f"{key}: {old.get(key, missing)} -> {new.get(key, missing)}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing)
    ]


def recipe_mismatch_message(saved_yaml: str, recipe: Recipe) -> str:
    """The error for a checkpoint made under another recipe: both recipe names and only the keys that differ."""
    saved = _read_saved(saved_yaml)
    saved_name = saved.get("name", "?") if isinstance(saved, dict) else "?"
    lines = recipe_differences(saved_yaml, recipe)
    return (
        f"lightning-quant: the checkpoint was made with a different recipe, {saved_name!r}, than this callback's "
        f"{recipe.name!r} ({recipe.source}); the settings that differ (checkpoint -> callback):\n  "
        + "\n  ".join(lines)
    )


def algorithm_takes(recipe: Any, overrides: list[str], key: str) -> bool:
    """True where the recipe's post-training algorithm has the option ``key`` (``iters``: the reconstructions), or
    where the recipe does not load (the callback then reports why)."""
    try:
        return key in ALGORITHMS[load_recipe(recipe, overrides).ptq.algorithm].option_names()
    except ValueError:  # RecipeError and an unknown algorithm
        return True
