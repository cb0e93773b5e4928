"""Shared test helpers: a quiet CPU Trainer and the float digits model that PTQ and export tests start from."""

import copy

import lightning.pytorch as pl

from lightning_quant import load_recipe, quantize_model
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier
from lightning_quant.ptq import calibrate, finalize, set_quant_state


def quiet_trainer(callbacks=(), **kw):
    """A CPU Trainer without logger, checkpoints, progress bar or model summary (unless ``kw`` asks for them)."""
    options = {
        "accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False,
    }  # fmt: skip
    return pl.Trainer(callbacks=list(callbacks), **{**options, **kw})


def epochs_trainer(tmp_path, epochs=2, callbacks=(), **kw):
    """A quiet, deterministic Trainer for ``epochs`` epochs that writes under ``tmp_path``."""
    return quiet_trainer(callbacks, max_epochs=epochs, default_root_dir=tmp_path, deterministic=True, **kw)


def train_float_digits_model():
    """A digits CNN (width 16) trained in float for 4 epochs with a fixed seed."""
    pl.seed_everything(0)
    model = ImageClassifier(DigitsCNN(width=16), optimizer="adam", lr=3e-3, epochs=4)
    quiet_trainer(max_epochs=4).fit(model, datamodule=DigitsDataModule())
    return model


def calibrated_copy(float_model, recipe_name, batches, overrides=()):
    """A copy of ``float_model`` quantized by ``recipe_name`` and calibrated on ``batches`` (keyword inputs), with
    the library calls the PTQ callback makes; returns the model and the recipe."""
    model = copy.deepcopy(float_model).eval()
    recipe = load_recipe(recipe_name, overrides=list(overrides))
    quantize_model(model, recipe.weights, recipe.activations, recipe.layers)
    calibrate(model, batches, lambda b: model(**b))
    finalize(model)
    set_quant_state(model, weights=True, activations=True)
    return model, recipe
