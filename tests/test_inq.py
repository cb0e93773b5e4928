"""INQ: power-of-two levels, staged freezing in a real Trainer.fit, checkpoint resume."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_quant import IncrementalQuantization, load_recipe
from lightning_quant.callbacks.inq import level_exponents, loss_aware_score, to_levels
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier
from lightning_quant.recipes import RecipeError


def test_level_set_follows_the_paper():
    w = torch.tensor([0.9, -0.3, 0.05])
    n1, n2 = level_exponents(w, bits=5)
    assert n1 == 0  # floor(log2(4 * 0.9 / 3)) = floor(0.263)
    assert n2 == n1 + 1 - 8  # 2^(5-1)/2 = 8 magnitudes, one code for zero
    q = to_levels(torch.tensor([0.9, -0.3, 0.2, 0.74, 0.76, 1e-4, -0.0]), n1, n2)
    assert q.tolist() == [1.0, -0.25, 0.25, 0.5, 1.0, 0.0, 0.0]  # midpoints 0.75 = (0.5 + 1) / 2, ...


def _levels_ok(w, n1, n2):
    mag = w.abs()[w != 0]
    exps = torch.log2(mag)
    return bool(torch.equal(exps, exps.round()) and exps.min() >= n2 and exps.max() <= n1)


def _fit(tmp_path, max_epochs, ckpt_path=None, recipe="inq_4bit"):
    pl.seed_everything(0)
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=max_epochs, weight_decay=1e-3)
    cb = IncrementalQuantization(recipe, overrides=["inq.epochs=[0,1,2,3]"])
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(model, datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    return model, cb, trainer


def test_frozen_weights_do_not_move_and_end_as_powers_of_two(tmp_path):
    model, cb, _ = _fit(tmp_path, 2)  # stages 1 and 2: 50% then 75%
    assert cb.stage == 1
    assert cb.quantized_fraction() == pytest.approx(0.75, abs=0.01)
    for name, layer in cb.layers(model).items():
        mask = cb.masks[name]
        w = layer.weight.detach()
        assert torch.equal(w[mask], cb.frozen[name][mask])  # SGD with momentum and weight decay ran: unchanged
        assert _levels_ok(w[mask], *cb.exponents[name])
        assert not torch.equal(w[~mask], cb.frozen[name][~mask])  # the free weights did train
        assert w[mask].abs().min() >= w[~mask].abs().min()  # magnitude partition: the largest went first
    model, cb, _ = _fit(tmp_path, 4)
    for name, layer in cb.layers(model).items():
        assert bool(cb.masks[name].all())
        assert _levels_ok(layer.weight.detach(), *cb.exponents[name])
        assert torch.unique(layer.weight.detach()).numel() <= 9  # 4 magnitudes, both signs, and zero


def test_resume_mid_schedule(tmp_path):
    model, cb, trainer = _fit(tmp_path, 2)
    ckpt = tmp_path / "inq.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, cb2, _ = _fit(tmp_path, 3, ckpt_path=ckpt)
    assert cb2.stage == 2
    for name in cb.masks:
        assert bool((cb2.masks[name] | ~cb.masks[name]).all())  # earlier decisions kept
    assert cb2.quantized_fraction() == pytest.approx(0.875, abs=0.01)


def test_inq_recipe_checks():
    with pytest.raises(RecipeError, match="inq.portions"):
        load_recipe("inq_5bit", ["inq.portions=[0.5,0.4,1.0,1.0]"])
    with pytest.raises(RecipeError, match="inq.partition='lottery'"):
        load_recipe("inq_5bit", ["inq.partition=lottery"])
    with pytest.raises(RecipeError, match="inq.levels=ternary means weights.bits=2"):
        load_recipe("elq_ternary", ["weights.bits=3"])


def test_loss_aware_score_prefers_harmless_weights():
    w = torch.tensor([0.5, 0.5, 0.5, 0.1])
    q = torch.tensor([1.0, 1.0, 0.0, 0.0])
    g = torch.tensor([-1.0, 1.0, 0.0, 0.0])  # raising w[0] lowers the loss, raising w[1] raises it
    score = loss_aware_score(w, q, g, error_weight=1.0)
    assert score[0] < score[1]
    assert score[3] < score[2]  # same (zero) loss change: the smaller approximation error goes first


@pytest.mark.parametrize(("recipe", "values"), [("elq_ternary", 3), ("elq_binary", 2)])
def test_elq_weights_end_ternary_or_binary_and_frozen_ones_stay(tmp_path, recipe, values):
    model, cb, _ = _fit(tmp_path, 2, recipe=recipe)
    assert cb.quantized_fraction() == pytest.approx(0.75, abs=0.01)
    for name, layer in cb.layers(model).items():
        mask = cb.masks[name]
        w = layer.weight.detach()
        assert torch.equal(w[mask], cb.frozen[name][mask])
        assert torch.unique(w[mask]).numel() <= values
    model, cb, _ = _fit(tmp_path, 4, recipe=recipe)
    for name, layer in cb.layers(model).items():
        w = layer.weight.detach()
        _, alpha = cb.ternary[name]
        assert set(torch.unique(w).tolist()) <= {-alpha, 0.0, alpha}
        assert torch.unique(w).numel() <= values


def test_inq_model_exports_its_power_of_two_weights_as_integers(tmp_path):
    """After INQ every weight is a power of two: ONNX and .pt2 store int8 codes (int16 past 127 steps), exact."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from lightning_quant import export
    from lightning_quant.export import compile_int8, export_torch

    model, cb, _ = _fit(tmp_path, 4)  # inq_4bit, every stage done
    w = to_levels(model.net.classifier.weight.data, 0, -7)  # 5-bit levels 2^-7 .. 2^0: 128 steps
    w[0, :2] = torch.tensor([1.0, 2.0**-7])
    model.net.classifier.weight.data = w
    model.eval()
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    path = export(model, x[:1], tmp_path / "inq.onnx")
    graph = onnx.load(str(path)).graph
    kinds = {i.name: i.data_type for i in graph.initializer if ".weight_int" in i.name}
    assert kinds == {
        "net.features.0.weight_int8": onnx.TensorProto.INT8,
        "net.features.3.weight_int8": onnx.TensorProto.INT8,
        "net.features.7.weight_int8": onnx.TensorProto.INT8,
        "net.classifier.weight_int16": onnx.TensorProto.INT16,
    }
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)  # the same weights; float activations
    program = export_torch(model, x[:2], tmp_path / "inq.pt2")
    with torch.no_grad():
        assert torch.equal(program.module()(x), ref)  # dequantized weights are the float weights, bit for bit
        torch.testing.assert_close(compile_int8(program)(x), ref, atol=1e-4, rtol=1e-4)


def test_cli_inq_checkpoint_exports(tmp_path, capsys):
    pytest.importorskip("onnx")
    from lightning_quant.cli import main as cli_main

    ckpt, out = tmp_path / "inq.ckpt", tmp_path / "inq.onnx"
    common = ["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "logs")]
    cli_main(
        ["fit", "--recipe", "inq_4bit", "--set", "inq.epochs=[0,1,2,3]", "--epochs", "4", "--float-epochs", "1"]
        + ["--checkpoint", str(ckpt), *common]
    )
    cli_main(["export", "--checkpoint", str(ckpt), "--recipe", "inq_4bit", "--output", str(out)])
    assert "exported inq_4bit (onnx)" in capsys.readouterr().out
    assert out.is_file()
