"""INQ: power-of-two levels, staged freezing in a real Trainer.fit, checkpoint resume."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_quant import IncrementalQuantization, list_recipes, load_recipe
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


# every ELQ recipe (kind inq, ternary or binary levels) with the number of distinct values its weights may take
ELQ_RECIPES = [
    (name, 3 if recipe.inq.levels == "ternary" else 2)
    for name in list_recipes()
    if (recipe := load_recipe(name)).kind == "inq" and recipe.inq.levels != "pow2"
]


@pytest.mark.parametrize(("recipe", "values"), ELQ_RECIPES)
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


# -- layer selection: the same rules as surgery (first/last, include/exclude, overrides) -----------------------
def _quantized_by_surgery(recipe, overrides):
    """The layers QAT's surgery quantizes on a fresh model under the same ``layers`` section."""
    from lightning_quant.nn import quantize_model

    r = load_recipe(recipe, overrides)
    net = ImageClassifier(DigitsCNN(width=8))
    report = quantize_model(net, r.weights, r.activations, r.layers)
    return {row.name for row in report.layers if row.status == "quantized"}


def _fit_with(tmp_path, recipe, overrides, max_epochs=1):
    pl.seed_everything(0)
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=max_epochs)
    cb = IncrementalQuantization(recipe, overrides=["inq.epochs=[0,1,2,3]", *overrides])
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit(model, datamodule=DigitsDataModule())
    return model, cb, trainer, start


def test_first_and_last_layer_float_stay_float_under_inq(tmp_path):
    overrides = ["layers.first_layer=float", "layers.last_layer=float"]
    model, cb, _, _ = _fit_with(tmp_path, "inq_4bit", overrides)
    assert set(cb.masks) == {"net.features.3", "net.features.7"} == _quantized_by_surgery("inq_4bit", overrides)
    w = model.net.features[0].weight.detach()
    assert torch.unique(w).numel() == w.numel()  # trained float weights, none rounded to a level


def test_first_layer_rule_applies_to_the_same_layer_as_surgery_when_it_is_excluded(tmp_path):
    """``first_layer`` names the first layer of the selected types, as surgery counts it; excluding that layer does
    not move the rule onto the next one (INQ once dropped the first layer left after include/exclude)."""
    overrides = ["layers.first_layer=float", "layers.exclude=[net.features.0]"]
    _, cb, _, _ = _fit_with(tmp_path, "inq_4bit", overrides)
    expected = _quantized_by_surgery("inq_4bit", overrides)
    assert expected == {"net.features.3", "net.features.7", "net.classifier"}
    assert set(cb.masks) == expected


def test_overrides_skip_a_layer_and_change_its_bits_under_inq(tmp_path):
    ov = "layers.overrides=[{pattern: net.classifier, skip: true}, {pattern: 'net.features.[03]', weight_bits: 3}]"
    model, cb, _, start = _fit_with(tmp_path, "inq_5bit", [ov], max_epochs=4)  # every stage: all weights frozen
    assert (
        set(cb.masks)
        == {"net.features.0", "net.features.3", "net.features.7"}
        == _quantized_by_surgery("inq_5bit", [ov])
    )
    w = model.net.classifier.weight.detach()
    assert not torch.equal(w, start["net.classifier.weight"]) and torch.unique(w).numel() == w.numel()  # float
    for name, magnitudes in (("net.features.0", 2), ("net.features.3", 2), ("net.features.7", 8)):  # 3, 3, 5 bits
        n1, n2 = cb.exponents[name]
        assert n2 == n1 + 1 - magnitudes  # 2^(bits-1)/2 magnitudes, one code for zero
        w = dict(model.named_modules())[name].weight.detach()
        assert _levels_ok(w, n1, n2)
        assert torch.unique(w.abs()).numel() <= magnitudes + 1  # the magnitudes and zero


@pytest.mark.parametrize(
    ("recipe", "override", "refused"),
    [
        ("inq_5bit", "{pattern: net.classifier, activation_bits: 4}", r"layers\.overrides\[0\]\.activation_bits=4"),
        ("inq_5bit", "{pattern: net.classifier, weight_bits: 1}", r"layers\.overrides\[0\]\.weight_bits=1.*2 to 8"),
        ("elq_ternary", "{pattern: net.classifier, weight_bits: 3}", r"layers\.overrides\[0\]\.weight_bits=3.*ternary"),
        ("inq_5bit", "{pattern: nets.classifier, skip: true}", r"layers\.overrides\[0\]\.pattern"),
    ],
)
def test_an_override_inq_cannot_honour_is_refused_naming_its_key(tmp_path, recipe, override, refused):
    with pytest.raises(MisconfigurationException, match=refused):
        _fit_with(tmp_path, recipe, [f"layers.overrides=[{override}]"])


# -- checkpoints: a resume under another recipe is refused, naming what differs --------------------------------
@pytest.mark.parametrize(
    ("saved", "resumed", "differs"),
    [
        (("inq_4bit", []), ("inq_3bit", []), r"weights\.bits: 4 -> 3"),
        (("inq_4bit", []), ("inq_4bit", ["weights.bits=3"]), r"weights\.bits: 4 -> 3"),
        (("inq_4bit", []), ("inq_4bit", ["layers.first_layer=float"]), r"layers\.first_layer: same -> float"),
        (("elq_ternary", []), ("elq_ternary", ["inq.levels=pow2"]), r"inq\.levels: ternary -> pow2"),
    ],
)
def test_resume_under_a_different_recipe_is_refused(tmp_path, saved, resumed, differs):
    _, _, trainer, _ = _fit_with(tmp_path, *saved)
    ckpt = tmp_path / "inq.ckpt"
    trainer.save_checkpoint(ckpt)
    pl.seed_everything(0)
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=2)
    cb = IncrementalQuantization(resumed[0], overrides=["inq.epochs=[0,1,2,3]", *resumed[1]])
    again = pl.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False, default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
    )  # fmt: skip
    with pytest.raises(MisconfigurationException, match=rf"different recipe(.|\n)*{differs}"):
        again.fit(model, datamodule=DigitsDataModule(), ckpt_path=ckpt)
