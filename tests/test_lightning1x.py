"""Scenarios of Lightning 1.x's ``QuantizationAwareTraining`` test suite, run against this plugin's callback.

Lightning 1.9 tested its callback on a small regression MLP whose ``training_step`` updates a torchmetrics
metric, on scikit-learn's ``make_regression`` data. The same shape of model and data is used here, and each
1.x scenario is mapped to what this plugin offers (see the README's "Coming from Lightning 1.x" section).
"""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import epochs_trainer as make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from sklearn.datasets import make_regression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError

from lightning_quant import QuantizationAwareTraining
from lightning_quant.export import deploy_model, export
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

    def __init__(self, batch_size: int = 32):
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


def qat(recipe="minmax_w8a8", overrides=(), **kw):
    return QuantizationAwareTraining(recipe, overrides=["diagnostics.summary=false", *overrides], **kw)


def test_mse(model, dm):
    model.eval()
    with torch.no_grad():
        return torch.stack([F.mse_loss(model(x), y) for x, y in dm.test_dataloader()]).mean()


test_mse.__test__ = False  # a helper, not a test


def quantizer_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "quantizer" in k}


@pytest.mark.parametrize("observer", ["ema", "mse"])  # 1.x observer_type: "average" and "histogram"
def test_parity_with_float_checkpoint_and_resume(tmp_path, observer):
    """1.x ``test_quantization``: QAT ends close to float training, converts to a smaller integer model, its
    checkpoint loads into the plain class (1.x needed strict=False; here it is strict) and resumes with the
    callback."""
    dm = RegressionData()
    pl.seed_everything(42)
    float_model = Regressor()
    start = {k: v.clone() for k, v in float_model.state_dict().items()}
    make_trainer(tmp_path / "float", 4).fit(float_model, datamodule=dm)
    float_mse = test_mse(float_model, dm)

    model = Regressor()
    model.load_state_dict(start)
    overrides = [f"activations.observer={observer}", "schedule.observer_steps=40"]  # 1.x collect_quantization=40
    callback = qat(overrides=overrides)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    t = make_trainer(tmp_path / "qat", 4, [callback, ckpt], enable_checkpointing=True)
    t.fit(model, datamodule=dm)
    quant_mse = test_mse(model, dm)
    assert float_mse < 0.05  # the task is learned
    assert quant_mse < 2 * float_mse + 0.02  # and 8-bit QAT stays close to float

    deployed = deploy_model(model)  # 1.x quantize_on_fit_end: the converted model, in memory
    x = dm.parts[2].tensors[0]
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-3 * float(model(x).abs().max()))
    int8_bytes = sum(t.numel() * t.element_size() for t in deployed.state_dict().values() if t.dtype == torch.int8)
    float_bytes = sum(p.numel() * 4 for n, p in float_model.named_parameters() if n.endswith("weight"))
    assert int8_bytes / float_bytes < 0.3  # 1.x asserted < 0.65 of the float size

    path = tmp_path / "ck" / "last.ckpt"
    plain = Regressor.load_from_checkpoint(path)  # strict
    assert not quantized_layers(plain)
    assert torch.equal(plain.layer_1.weight, model.layer_1.weight)  # the QAT-trained latent weights
    restored = make_trainer(tmp_path / "eval", 1, [qat(overrides=overrides)])  # ... and the scales, by ckpt_path
    result = restored.test(plain, datamodule=dm, ckpt_path=str(path), verbose=False)[0]
    assert result["test_MSE"] == pytest.approx(float(quant_mse), rel=1e-4)

    resumed = Regressor()
    callback2 = qat(overrides=overrides)
    make_trainer(tmp_path / "resume", 5, [callback2]).fit(resumed, datamodule=dm, ckpt_path=str(path))
    assert callback2.quant_steps == callback.quant_steps + 15  # one more epoch of 15 batches
    assert test_mse(resumed, dm) < 2 * float_mse + 0.02


def test_evaluation_never_changes_quantizer_state(tmp_path):
    """1.x ``test_quantization_val_test_predict`` (observer_enabled_stages=("train",)): validation inside fit and
    validate/test/predict afterwards leave the trained model exactly as a fit without validation leaves it."""
    dm = RegressionData()
    pl.seed_everything(42)
    start = Regressor().state_dict()
    with_eval = Regressor()
    with_eval.load_state_dict(start)
    t = make_trainer(tmp_path, 3, [qat()], limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1)
    t.fit(with_eval, datamodule=dm)
    t.validate(with_eval, datamodule=dm, verbose=False)
    t.test(with_eval, datamodule=dm, verbose=False)
    t.predict(with_eval, datamodule=dm)

    plain = Regressor()
    plain.load_state_dict(start)
    make_trainer(tmp_path, 3, [qat()], limit_train_batches=2, limit_val_batches=0).fit(plain, datamodule=dm)
    a, b = with_eval.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_observer_steps_and_start_epoch_replace_collect_quantization(tmp_path):
    """1.x ``collect_quantization`` (an int: observe that many forwards; a callable: when to quantize) maps to
    ``schedule.observer_steps`` and ``schedule.start_epoch``/``start_step``."""
    dm = RegressionData()

    def run(epochs, overrides):
        pl.seed_everything(0)
        model = Regressor()
        callback = qat(overrides=overrides)
        make_trainer(tmp_path, epochs, [callback], limit_train_batches=1, limit_val_batches=0).fit(model, datamodule=dm)
        return model, callback

    frozen, cb = run(4, ["schedule.observer_steps=3"])
    assert cb.quant_steps == 4
    assert not frozen.layer_1.input_quantizer.observer_enabled
    three, _ = run(3, [])  # the same first three steps, observing throughout
    for name in ("layer_0", "layer_1", "layer_2", "layer_end"):
        a = getattr(frozen, name).input_quantizer.state_dict()
        b = getattr(three, name).input_quantizer.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name  # activation ranges stopped after three steps

    last, cb = run(4, ["schedule.start_epoch=3"])  # 1.x: a trigger that fires in the last epoch only
    assert cb.quant_steps == 1


def test_configuration_errors_are_clear_and_early(tmp_path):
    """1.x ``test_quantization_exceptions``: bad settings fail at construction; names that are not in the model
    (1.x: ``modules_to_fuse``; here: name globs) fail at setup, before any training step."""
    with pytest.raises(MisconfigurationException, match="activations.observer"):
        qat(overrides=["activations.observer=abc"])
    with pytest.raises(MisconfigurationException, match="schedule.observer_steps"):
        qat(overrides=["schedule.observer_steps=abc"])
    with pytest.raises(MisconfigurationException, match="x.onnx2"):
        qat(export_path="x.onnx2")
    with pytest.raises(MisconfigurationException, match=r"packed export holds 1-bit weights"):
        qat(export_path=str(tmp_path / "x.packed"))
    with pytest.raises(MisconfigurationException, match=r"weights.method='dorefa' has no integer-grid export"):
        qat("dorefa_w4a4", export_path=str(tmp_path / "x.onnx"))

    for key in ("quantize_outputs", "quantize_inputs", "include", "exclude"):
        model = Regressor()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        callback = qat(overrides=[f"layers.{key}=[layer_0,layers.NONE_1]"])
        with pytest.raises(MisconfigurationException, match=rf"layers.{key}: the glob 'layers.NONE_1' matches no"):
            make_trainer(tmp_path, 1, [callback]).fit(model, datamodule=RegressionData())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_export_path_without_example_input_array_uses_the_first_batch(tmp_path):
    """No ``example_input_array`` and no datamodule (plain dataloaders): the export takes its example from the
    first training batch (it used to fail in on_fit_end, after all the training)."""
    dm = RegressionData()
    model = Regressor()
    path = tmp_path / "model.pt2"
    t = make_trainer(tmp_path, 1, [qat(export_path=str(path))], limit_train_batches=3, limit_val_batches=1)
    t.fit(model, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
    assert path.stat().st_size > 0


class DictRegressor(Regressor):
    """Batches are dicts, so no tensor example input can be taken from them."""

    def forward(self, features):
        return super().forward(features)

    def training_step(self, batch, batch_idx):
        self.steps = getattr(self, "steps", 0) + 1
        return F.mse_loss(self(features=batch["x"]), batch["y"])


def test_export_path_with_no_usable_example_fails_before_training(tmp_path):
    data = [{"x": torch.randn(8, FEATURES), "y": torch.randn(8, 1)} for _ in range(4)]
    model = DictRegressor()
    t = make_trainer(tmp_path, 1, [qat(export_path=str(tmp_path / "m.onnx"))])
    with pytest.raises(MisconfigurationException, match=r"needs a tensor example input.*dict.*example_input_array"):
        t.fit(model, train_dataloaders=data)
    assert getattr(model, "steps", 0) == 0  # refused at the first batch, before any step


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
