"""Scenarios of Lightning 1.x's ``QuantizationAwareTraining`` test suite, run against this plugin's callback.

Lightning 1.9 tested its callback on a small regression MLP whose ``training_step`` updates a torchmetrics
metric, on scikit-learn's ``make_regression`` data. The same shape of model and data is used here, and each
1.x scenario is mapped to what this plugin offers (see the README's "Coming from Lightning 1.x" section).
"""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from sklearn.datasets import make_regression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError

from lightning_quant import QuantizationAwareTraining
from lightning_quant.deploy import deploy_model, export
from lightning_quant.nn import quantized_layers

FEATURES = 16


class Regressor(pl.LightningModule):
    """Three hidden Linear+ReLU layers of width 64 and a Linear head; MSE metrics updated in every step."""

    def __init__(self, lr: float = 0.01):
        super().__init__()
        self.lr = lr
        self.layer_0 = nn.Linear(FEATURES, 64)
        self.layer_0a = nn.ReLU()
        self.layer_1 = nn.Linear(64, 64)
        self.layer_1a = nn.ReLU()
        self.layer_2 = nn.Linear(64, 64)
        self.layer_2a = nn.ReLU()
        self.layer_end = nn.Linear(64, 1)
        self.train_mse = MeanSquaredError()
        self.valid_mse = MeanSquaredError()
        self.test_mse = MeanSquaredError()

    def forward(self, x):
        for i in range(3):
            x = getattr(self, f"layer_{i}a")(getattr(self, f"layer_{i}")(x))
        return self.layer_end(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("train_MSE", self.train_mse(out, y))  # the metric caches `out`, which holds the autograd graph
        return F.mse_loss(out, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_MSE", self.valid_mse(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_MSE", self.test_mse(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class RegressionData(pl.LightningDataModule):
    """``make_regression`` (800 samples, 16 features, fixed seed), targets scaled to unit variance; 60/20/20 split."""

    def __init__(self, batch_size: int = 16):
        super().__init__()
        x, y = make_regression(n_samples=800, n_features=FEATURES, noise=1.0, random_state=42)
        x = torch.tensor(x, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
        y = y / y.std()
        self.parts = [TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 480), (480, 640), (640, 800))]
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.parts[0], batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.parts[1], batch_size=160)

    def test_dataloader(self):
        return DataLoader(self.parts[2], batch_size=160)

    def predict_dataloader(self):
        return self.test_dataloader()


def make_trainer(tmp_path, epochs=2, callbacks=(), **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **kw,
    )


def qat(recipe="minmax_w8a8", overrides=(), **kw):
    return QuantizationAwareTraining(recipe, overrides=["diagnostics.summary=false", *overrides], **kw)


def test_mse(model, dm):
    model.eval()
    with torch.no_grad():
        return torch.stack([F.mse_loss(model(x), y) for x, y in dm.test_dataloader()]).mean()


test_mse.__test__ = False  # a helper, not a test


def test_export_path_with_a_metric_updated_in_training_step(tmp_path):
    """1.x converted in ``on_fit_end``; here ``export_path`` writes the integer model then. The module's metric
    holds a tensor with an autograd graph, which must not stop the export (it used to: deepcopy refused it)."""
    pl.seed_everything(0)
    dm = RegressionData()
    model = Regressor()
    path = tmp_path / "regressor.pt2"
    make_trainer(tmp_path, 2, [qat(export_path=str(path))], limit_train_batches=6).fit(model, datamodule=dm)
    assert model.train_mse._forward_cache.grad_fn is not None  # the state that broke deepcopy is still there
    assert path.stat().st_size > 0
    x = dm.parts[2].tensors[0][:8]
    assert export(model, x[:1], tmp_path / "again.pt2").exists()  # the function, called by hand, as well
    deployed = deploy_model(model)  # the in-memory convert (1.x: quantize_on_fit_end=True)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4)
