import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import epochs_trainer as trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from wandb_records import history_keys

from lightning_quant import IncrementalQuantization, PostTrainingQuantization, QuantizationAwareTraining
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier
from lightning_quant.nn import dequantize_model, quantized_layers
from lightning_quant.quantizers import Quantizer


def quantizer_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "quantizer" in k}


def qat(recipe="lsq_w4a4", overrides=None, **kw):
    return QuantizationAwareTraining(recipe, overrides=["diagnostics.summary=false", *(overrides or [])], **kw)


def test_fit_on_digits_quantizes_and_trains_scales(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier(DigitsCNN(width=16), optimizer="sgd", lr=0.05, epochs=3)
    t = trainer(tmp_path, 3, [qat()])
    t.fit(model, datamodule=DigitsDataModule())
    layers = dict(quantized_layers(model))
    assert set(layers) == {"net.features.0", "net.features.3", "net.features.7", "net.classifier"}
    scale = layers["net.features.3"].weight_quantizer.scale
    optimizer_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert id(scale) in optimizer_params  # learned step sizes reach the user's optimizer
    assert layers["net.features.3"].weight_quantizer.bits == 4
    assert t.callback_metrics["val_acc"] > 0.75  # real learning under 4-bit quantization (chance is 0.10)


def _resume_setup(tmp_path):
    dm = DigitsDataModule(shuffle=False)
    pl.seed_everything(0)
    full = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=4)
    init = {k: v.clone() for k, v in full.state_dict().items()}
    return dm, full, init


def test_resume_from_mid_run_checkpoint_is_exact(tmp_path):
    dm, full, init = _resume_setup(tmp_path)
    t_full = trainer(tmp_path / "a", 4, [qat()], limit_train_batches=5)
    t_full.fit(full, datamodule=dm)

    first = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=4)
    first.load_state_dict(init)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer(tmp_path / "b", 2, [qat(), ckpt], limit_train_batches=5, enable_checkpointing=True).fit(
        first, datamodule=dm
    )

    resumed = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=4)
    callback = qat()
    t_resumed = trainer(tmp_path / "c", 4, [callback], limit_train_batches=5)
    t_resumed.fit(resumed, datamodule=dm, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert callback.quant_steps == 20
    a, b = quantizer_state(full), quantizer_state(resumed)
    assert a.keys() == b.keys()
    assert len(a) > 0
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert torch.allclose(t_full.callback_metrics["val_acc"], t_resumed.callback_metrics["val_acc"])
    assert torch.allclose(t_full.callback_metrics["val_loss"], t_resumed.callback_metrics["val_loss"], atol=1e-5)


def test_checkpoint_loads_into_plain_class_and_evaluates(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule()
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=2)
    t = trainer(tmp_path, 2, [qat()], limit_train_batches=8)
    t.fit(model, datamodule=dm)
    path = tmp_path / "qat.ckpt"
    t.save_checkpoint(path)
    expected = t.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    trained = quantizer_state(model)

    # the plain LightningModule class loads the checkpoint strictly (float keys only in state_dict)
    plain = ImageClassifier.load_from_checkpoint(path, net=DigitsCNN(width=8))
    assert not quantized_layers(plain)
    # ... and a Trainer with the callback restores the learned scales for validate/test/predict
    for stage in ("validate", "test", "predict"):
        fresh = ImageClassifier.load_from_checkpoint(path, net=DigitsCNN(width=8))
        t2 = trainer(tmp_path, 1, [qat()])
        out = getattr(t2, stage)(
            fresh, datamodule=dm, ckpt_path=str(path), **({} if stage == "predict" else {"verbose": False})
        )
        restored = quantizer_state(fresh)
        assert all(torch.equal(trained[k], restored[k]) for k in trained), stage
        if stage == "test":
            assert out[0]["test_acc"] == pytest.approx(expected)


def test_eval_without_trained_state_warns(tmp_path):
    model = ImageClassifier(DigitsCNN(width=8))
    with pytest.warns(UserWarning, match="hold no trained state.*ckpt_path"):
        trainer(tmp_path, 1, [qat()]).validate(model, datamodule=DigitsDataModule(), verbose=False)


def test_fit_twice_on_the_same_model(tmp_path):
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=1)
    dm = DigitsDataModule()
    trainer(tmp_path, 1, [qat()], limit_train_batches=3).fit(model, datamodule=dm)
    scale = model.net.features[3].weight_quantizer.scale
    t = trainer(tmp_path, 1, [qat()], limit_train_batches=3)
    t.fit(model, datamodule=dm)
    assert model.net.features[3].weight_quantizer.scale is scale
    assert id(scale) in {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}


def test_bad_recipe_fails_before_training(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("description: x\nweights:\n  bits: 12\n")
    with pytest.raises(MisconfigurationException, match=r"bad\.yaml: weights\.bits=12"):
        QuantizationAwareTraining(str(bad))


def test_unsupported_layer_warns_by_name(tmp_path):
    class WithLSTM(ImageClassifier):
        def __init__(self):
            super().__init__(DigitsCNN(width=8), optimizer="sgd", epochs=1)
            self.extra = nn.LSTM(4, 4)

    with pytest.warns(UserWarning, match=r"left in float: 'extra' \(LSTM\)"):
        trainer(tmp_path, 1, [qat()], limit_train_batches=2).fit(WithLSTM(), datamodule=DigitsDataModule())


def test_works_with_model_pruning(tmp_path):
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=2)
    prune = ModelPruning("l1_unstructured", amount=0.5, parameters_to_prune=[(model.net.features[3], "weight")])
    t = trainer(tmp_path, 2, [qat(), prune], limit_train_batches=3)
    t.fit(model, datamodule=DigitsDataModule())
    conv = model.net.features[3]
    assert isinstance(conv.weight_quantizer, Quantizer)
    assert float((conv.weight == 0).float().mean()) >= 0.5  # pruning applied to the quantized layer's weight


class KwargsModel(pl.LightningModule):
    """forward takes keyword arguments and batches are dicts."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, *, pixels, scale=1.0):
        return self.head(torch.relu(self.body(pixels.flatten(1) * scale)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(pixels=x, scale=1.0), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_forward_with_keyword_arguments(tmp_path):
    model = KwargsModel()
    trainer(tmp_path, 1, [qat(overrides=None)], limit_train_batches=3).fit(model, datamodule=DigitsDataModule())
    assert model.body.weight_quantizer._initialized


def test_compiled_model(tmp_path):
    net = DigitsCNN(width=8)
    model = ImageClassifier(torch.compile(net, backend="aot_eager"), optimizer="sgd", epochs=1)
    t = trainer(tmp_path, 1, [qat()], limit_train_batches=3, limit_val_batches=1)
    t.fit(model, datamodule=DigitsDataModule())
    assert isinstance(net.features[3].weight_quantizer, Quantizer)
    assert net.features[3].weight_quantizer._initialized
    assert "net.features.3" in dict(quantized_layers(model))  # _orig_mod is hidden from names


def test_schedule_start_epoch_and_observer_freeze(tmp_path):
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=2)
    callback = qat("minmax_w8a8", overrides=["schedule.start_epoch=1", "schedule.observer_steps=2"])
    t = trainer(tmp_path, 2, [callback], limit_train_batches=4)
    t.fit(model, datamodule=DigitsDataModule())
    q = model.net.features[3].input_quantizer
    assert callback.quant_steps == 4  # only epoch 1 quantized
    assert q.fake_quant_enabled
    assert not q.observer_enabled


def test_bn_folding_and_freeze_in_fit(tmp_path):
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=2)
    callback = qat("lsq_w4a4", overrides=["layers.fold_bn=true", "schedule.freeze_bn_epoch=1"])
    trainer(tmp_path, 2, [callback], limit_train_batches=3).fit(model, datamodule=DigitsDataModule())
    conv = model.net.features[3]
    assert conv.folded_bn is model.net.features[4]
    assert conv.bn_frozen


def test_csv_and_tensorboard_logging(tmp_path):
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=1)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer(tmp_path, 1, [qat(overrides=["diagnostics.every_n_steps=2"])], logger=loggers, limit_train_batches=4).fit(
        model, datamodule=DigitsDataModule()
    )
    with open(Path(loggers[0].log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0])
    for key in (
        "quant/net.features.3/weight_sqnr_db",
        "quant/net.features.3/act_clipped",
        "quant_val/net.classifier/act_sqnr_db",
        "model/compression",
        "model/effective_bits",
    ):
        assert key in columns, key
    sqnr = [float(r["quant/net.features.3/weight_sqnr_db"]) for r in rows if r["quant/net.features.3/weight_sqnr_db"]]
    assert sqnr
    assert all(5 < v < 40 for v in sqnr)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(loggers[1].log_dir, size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert "quant/sqnr_per_layer" in acc.Tags()["images"]
    assert "weights/net.features.3" in acc.Tags()["histograms"]


def test_wandb_offline_run_holds_quantization_metrics(tmp_path):
    warnings.filterwarnings("ignore")
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=1)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lq-test")
    trainer(tmp_path, 1, [qat(overrides=["diagnostics.every_n_steps=2"])], logger=logger, limit_train_batches=4).fit(
        model, datamodule=DigitsDataModule()
    )
    logger.experiment.finish()
    run_file = next(Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb"))
    history = history_keys(run_file)
    for key in (
        "quant/net.features.3/weight_sqnr_db",
        "quant/net.features.3/weight_scale",
        "quant/net.features.3/act_clipped",
        "quant_val/net.features.7/act_sqnr_db",
        "model/size_mb",
    ):
        assert key in history, key
    assert float(history["model/compression"][0]) > 4
    assert any(k.startswith("quant/sqnr_per_layer") for k in history)  # the per-layer figure


@pytest.mark.parametrize("qat_first", [True, False])
def test_model_pruning_in_either_order_keeps_checkpoints_loadable(tmp_path, qat_first):
    """ModelPruning rebuilds ``state_dict`` in its own on_save_checkpoint; the quantizer keys must still end up
    under checkpoint["lightning_quant"] only, whichever callback the user lists first."""
    pl.seed_everything(0)
    dm = DigitsDataModule()
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=2)
    prune = ModelPruning("l1_unstructured", amount=0.3)
    t = trainer(tmp_path, 1, [qat(), prune] if qat_first else [prune, qat()], limit_train_batches=3)
    t.fit(model, datamodule=dm)
    path = tmp_path / "pruned.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "quantizer" in k]
    assert ckpt["lightning_quant"]["quantizer_state"]
    plain = ImageClassifier.load_from_checkpoint(path, net=DigitsCNN(width=8))  # strict
    assert float((plain.net.features[3].weight == 0).float().mean()) > 0.29  # the pruned weights came along
    resumed = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=2)
    prune2 = ModelPruning("l1_unstructured", amount=0.3)
    callbacks = [qat(), prune2] if qat_first else [prune2, qat()]
    trainer(tmp_path, 2, callbacks, limit_train_batches=3).fit(resumed, datamodule=dm, ckpt_path=str(path))
    assert resumed.net.features[3].weight_quantizer._initialized


def test_second_fit_with_another_recipe_is_refused_naming_both(tmp_path):
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=1)
    dm = DigitsDataModule()
    trainer(tmp_path, 1, [qat("lsq_w4a4")], limit_train_batches=2).fit(model, datamodule=dm)
    match = r"quantized with recipe 'lsq_w4a4'.*re-quantized with 'lsq_w2a2'"
    with pytest.raises(MisconfigurationException, match=match):
        trainer(tmp_path, 1, [qat("lsq_w2a2")], limit_train_batches=2).fit(model, datamodule=dm)
    assert model.net.features[3].weight_quantizer.bits == 4  # nothing changed
    dequantize_model(model)  # back to float: the other recipe now applies
    trainer(tmp_path, 1, [qat("lsq_w2a2")], limit_train_batches=2).fit(model, datamodule=dm)
    assert model.net.features[3].weight_quantizer.bits == 2


@pytest.mark.parametrize("recipe", ["lsq_w4a4", "minmax_w8a8"])  # examples: a learned step and an observer
def test_a_reused_callback_instance_acts_like_a_fresh_one(tmp_path, recipe):
    """The same instance in a second Trainer (on a fresh model) must give exactly what a fresh instance gives."""
    dm = DigitsDataModule(shuffle=False)
    overrides = ["schedule.observer_steps=2"]

    def run(callback):
        pl.seed_everything(0)
        model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=1)
        trainer(tmp_path, 1, [callback], limit_train_batches=4, limit_val_batches=1).fit(model, datamodule=dm)
        return quantizer_state(model), callback.quant_steps

    reused = qat(recipe, overrides)
    run(reused)
    again, steps = run(reused)
    fresh, fresh_steps = run(qat(recipe, overrides))
    assert steps == fresh_steps == 4
    assert again.keys() == fresh.keys() and fresh
    differ = [k for k in fresh if not torch.equal(again[k], fresh[k])]
    assert not differ, differ


def test_two_quantization_callbacks_on_one_trainer_are_refused(tmp_path):
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=1)
    callbacks = [qat("lsq_w4a4"), PostTrainingQuantization("minmax_w8a8")]
    with pytest.raises(MisconfigurationException, match=r"two quantization callbacks, .*'lsq_w4a4'.*'minmax_w8a8'"):
        trainer(tmp_path, 1, callbacks, limit_train_batches=2).fit(model, datamodule=DigitsDataModule())
    assert not quantized_layers(model)  # refused before any surgery


def test_recipe_mismatch_on_resume_is_refused_listing_only_the_keys_that_differ(tmp_path):
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=1)
    dm = DigitsDataModule()
    t = trainer(tmp_path, 1, [qat("lsq_w4a4")], limit_train_batches=2)
    t.fit(model, datamodule=dm)
    t.save_checkpoint(tmp_path / "a.ckpt")
    other = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", epochs=2)
    with pytest.raises(MisconfigurationException) as err:
        trainer(tmp_path, 2, [qat("lsq_w4a4", weight_bits=3)], limit_train_batches=2).fit(
            other, datamodule=dm, ckpt_path=str(tmp_path / "a.ckpt")
        )
    message = str(err.value)
    assert "different recipe, 'lsq_w4a4', than this callback's 'lsq_w4a4'" in message
    assert "weights.bits: 4 -> 3" in message
    assert len(message.splitlines()) <= 3  # the header and the one differing key, not the whole recipe


class NoExampleModel(ImageClassifier):
    """Most models set no example_input_array; this one also carries an Embedding (not quantized by default)."""

    def __init__(self):
        super().__init__(DigitsCNN(width=8), optimizer="sgd", epochs=1)
        self.example_input_array = None
        self.extra = nn.Embedding(4, 4)


def test_macs_and_bops_come_from_the_first_batch_without_example_input(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, 1, [qat()], logger=logger, limit_train_batches=2, limit_val_batches=1)
    t.fit(NoExampleModel(), datamodule=DigitsDataModule())
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("model/bops_ratio")]
    ratio = float(rows[0]["model/bops_ratio"])
    assert 4 * 4 / 32**2 < ratio < 8 * 8 / 32**2  # between W4A4 and W8A8 (first and last layers at 8 bits)


def test_summary_that_cannot_run_a_forward_says_so(tmp_path):
    with pytest.warns(UserWarning, match="summary could not run a forward.*MACs and BOPs are not reported"):
        trainer(tmp_path, 1, [qat()], limit_train_batches=2).fit(KwargsModel(), datamodule=DigitsDataModule())


def test_left_in_float_warning_is_given_once_per_model(tmp_path):
    model = NoExampleModel()
    t = trainer(tmp_path, 1, [qat()], limit_train_batches=2, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, datamodule=DigitsDataModule())
        t.validate(model, datamodule=DigitsDataModule(), verbose=False)
        t.test(model, datamodule=DigitsDataModule(), verbose=False)
    assert len([w for w in caught if "left in float: 'extra' (Embedding)" in str(w.message)]) == 1


def test_a_reused_inq_callback_acts_like_a_fresh_one(tmp_path):
    def run(callback):
        pl.seed_everything(0)
        model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=2)
        trainer(tmp_path, 2, [callback], limit_train_batches=2, limit_val_batches=0).fit(
            model, datamodule=DigitsDataModule(shuffle=False)
        )
        return model.state_dict()

    reused = IncrementalQuantization("inq_4bit", overrides=["inq.epochs=[0,1,2,3]"])
    run(reused)
    again = run(reused)
    fresh = run(IncrementalQuantization("inq_4bit", overrides=["inq.epochs=[0,1,2,3]"]))
    differ = [k for k in fresh if not torch.equal(again[k], fresh[k])]
    assert not differ, differ
