"""Diagnostics: a collapsed quantizer is reported by name, and the per-layer SQNR chart follows the model."""

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer

from lightning_quant import QuantizationAwareTraining
from lightning_quant.callbacks.diagnostics import ActivationRecorder, weight_metrics
from lightning_quant.examples import DigitsCNN, DigitsDataModule
from lightning_quant.nn import quantize_model, quantized_layers
from lightning_quant.recipes import load_recipe


class CollapseOneStep(pl.Callback):
    """From the second training batch on, give one layer's activation step a value that rounds every input to 0."""

    def __init__(self, layer: str) -> None:
        self.layer = layer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            with torch.no_grad():
                pl_module.get_submodule(self.layer).input_quantizer.scale.fill_(1e4)


def test_a_collapsed_activation_quantizer_is_named_in_a_warning(float_model):
    pl.seed_everything(0)
    model = copy.deepcopy(float_model)
    model.hparams.update(optimizer="sgd", lr=0.01, epochs=1)  # lsq_w4a4's fine-tuning settings
    qat = QuantizationAwareTraining("lsq_w4a4", overrides=["diagnostics.summary=false", "diagnostics.every_n_steps=1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer([qat, CollapseOneStep("net.classifier")], max_epochs=1, limit_train_batches=3).fit(
            model, datamodule=DigitsDataModule()
        )
    collapsed = [str(w.message) for w in caught if "has collapsed" in str(w.message)]
    # once, and only for the broken layer (the last, so that no layer after it sees a zero input)
    assert len(collapsed) == 1, collapsed
    assert "layer 'net.classifier': activation SQNR is 0.00 dB at 8 bits" in collapsed[0]


def test_the_sqnr_chart_lists_layers_in_model_order():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_quant.callbacks.diagnostics import sqnr_figure  # before: the chart was drawn inside log_plots

    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    recipe = load_recipe("lsq_w4a4")
    quantize_model(model, recipe.weights, recipe.activations, recipe.layers)
    dm = DigitsDataModule()
    dm.setup("fit")
    recorder = ActivationRecorder(model)
    model(dm.train_set.tensors[0][:64])
    metrics = {**weight_metrics(model), **recorder.remove()}
    fig = sqnr_figure(0, metrics, model, plt)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    plt.close(fig)
    order = [name for name, _ in quantized_layers(model)]
    assert labels == order == ["features.0", "features.3", "features.7", "classifier"]  # not alphabetical
