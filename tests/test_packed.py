"""Binary and ternary export: every binary recipe round-trips through the packed format (a torch.export program
loaded without pickle), ternary weights export to ONNX and .pt2, and what a recipe attaches to a layer is carried
or refused by name."""

import copy
import io
import json
import re
import subprocess
import sys
import textwrap
import warnings
import zipfile

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from torch import nn

from lightning_quant import Binarization, ExportError, export, list_recipes, load_packed, load_recipe
from lightning_quant.examples import DigitsDataModule, ImageClassifier
from lightning_quant.nn import quantized_layers

BINARY_RECIPES = [name for name in list_recipes() if load_recipe(name).kind == "binary"]
TERNARY_RECIPES = [name for name in BINARY_RECIPES if load_recipe(name).weights.bits == 2]  # kind binary, 2 bits


def mlp() -> nn.Sequential:
    """The issue's MLP (Linear -> BatchNorm1d -> Hardtanh) on 8x8 digits; first and last Linear stay float."""
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in in (64, 48, 48):
        layers += [nn.Linear(n_in, 48), nn.BatchNorm1d(48), nn.Hardtanh()]
    return nn.Sequential(*layers, nn.Linear(48, 10))


def _train(recipe: str, net: nn.Module) -> ImageClassifier:
    """``net`` after a few training batches under ``Binarization(recipe)`` on digits, in eval mode."""
    pl.seed_everything(0)
    model = ImageClassifier(net, optimizer="adam", lr=5e-3, epochs=1)
    callback = Binarization(recipe, ["diagnostics.summary=false"])
    trainer = quiet_trainer([callback], max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule())
    return model.eval()


_TRAINED: dict[str, ImageClassifier] = {}


def trained(recipe: str) -> ImageClassifier:
    """The MLP trained under ``recipe`` (trained once per test session; each caller gets its own copy)."""
    if recipe not in _TRAINED:
        _TRAINED[recipe] = _train(recipe, mlp())
    return copy.deepcopy(_TRAINED[recipe])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    dm = DigitsDataModule(shuffle=False)
    dm.setup("test")
    return torch.cat([x for x, _ in dm.test_dataloader()])


@pytest.mark.parametrize("recipe", BINARY_RECIPES)
def test_every_binary_recipe_round_trips_through_the_packed_format_exactly(recipe, images, tmp_path):
    model = trained(recipe)
    path = export(model, images[:4], tmp_path / f"{recipe}.packed")
    packed = load_packed(path)
    with torch.no_grad():
        ref, got = model(images), packed(images)
    assert torch.equal(got, ref), f"{recipe}: max |trained - packed| = {float((got - ref).abs().max())}"
    bits = load_recipe(recipe).weights.bits  # sketch: bases; ternary: 2 bits
    state = packed.state_dict()
    binary = quantized_layers(model)
    assert len(binary) == 2  # first and last Linear stay float
    for name, layer in binary:
        buffer = state[f"{name}.packed_weight"]
        assert buffer.dtype == torch.uint8
        assert buffer.numel() == -(-layer.weight.numel() * bits // 8)  # ceil(bits per weight / 8)
        assert f"{name}.weight" not in state  # no latent float weight in the file


def test_reactnet_carries_rprelu_and_rsign_shift_into_the_packed_model(images, tmp_path):
    model = trained("reactnet")
    layer = quantized_layers(model)[0][1]
    with torch.no_grad():  # trained values would be close to the init: make them matter
        layer.rprelu.gamma.normal_(0, 0.5)
        layer.rprelu.zeta.normal_(0, 0.5)
        layer.input_quantizer.shift.normal_(0, 0.5)
    packed = load_packed(export(model, images[:1], tmp_path / "reactnet.packed"))  # batch 1: stays dynamic
    state = packed.state_dict()
    assert any(k.endswith("rprelu.gamma") for k in state) and any(k.endswith("input_quantizer.shift") for k in state)
    with torch.no_grad():
        assert torch.equal(packed(images), model(images))


@pytest.mark.parametrize("fmt", ["packed", "onnx", "torch"])
@pytest.mark.parametrize("attach", ["forward_hook", "pre_hook", "submodule", "quantizer_hook"])
def test_unknown_attachments_on_quantized_layers_are_refused_with_the_layer_named(fmt, attach, images, tmp_path):
    model = trained("twn" if fmt != "packed" else "reactnet")
    name, layer = quantized_layers(model)[0]
    if attach == "forward_hook":
        layer.register_forward_hook(lambda m, a, y: y * 2)
    elif attach == "pre_hook":
        layer.register_forward_pre_hook(lambda m, a: (a[0] + 1,))
    elif attach == "submodule":
        layer.adapter = nn.Linear(48, 48)
    else:
        layer.weight_quantizer.register_forward_hook(lambda m, a, y: y * 2)
    suffix = {"packed": "packed", "onnx": "onnx", "torch": "pt2"}[fmt]
    with pytest.raises(ExportError, match=f"'{name}'"):
        export(model, images[:4], tmp_path / f"m.{suffix}")


@pytest.mark.parametrize("recipe", TERNARY_RECIPES)
def test_ternary_weights_export_to_onnx_torch_and_packed(recipe, images, tmp_path):
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (the .pt2 program's dequantize ops)

    ort = pytest.importorskip("onnxruntime")
    model = trained(recipe)
    with torch.no_grad():
        ref = model(images)
    layer = quantized_layers(model)[0][1]
    q = layer.weight_quantizer
    if recipe == "ttq":
        assert float(q.w_pos) != float(q.w_neg)  # learned: the asymmetric case is exercised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_path = export(model, images[:4], tmp_path / "m.onnx")
        pt2_path = export(model, images[:4], tmp_path / "m.pt2")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # onnxruntime's own GEMM: float reordering only
    import onnx

    proto = onnx.load(str(onnx_path))
    codes = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    codes = [set(c.reshape(-1).tolist()) for c in codes if c.size == layer.weight.numel()]
    assert len(codes) == (2 if recipe == "twn" else 4)  # TTQ: positive and negative codes, each with its scale
    assert all(c <= {-1, 0, 1} for c in codes) and set().union(*codes) == {-1, 0, 1}
    program = torch.export.load(str(pt2_path))
    with torch.no_grad():
        assert torch.equal(program.module()(images), ref)
    packed = load_packed(export(model, images[:4], tmp_path / "m.packed"))
    with torch.no_grad():
        assert torch.equal(packed(images), ref)


def test_twn_forward_weights_are_exactly_three_values():
    torch.manual_seed(0)
    from lightning_quant.quantizers import QuantizerConfig, build_quantizer

    q = build_quantizer(QuantizerConfig(method="twn", bits=2), "weight")
    w = (torch.randn(16, 300) * 3).requires_grad_()  # x + (t - x) gave 5-7 values per row here, not 3
    out = q(w)
    alpha = float(out.abs().max())
    for row in out.detach():
        assert set(row.tolist()) <= {-alpha, 0.0, alpha}
    assert torch.unique(out.detach()).numel() == 3
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through


def test_packed_file_loads_in_a_fresh_process_without_the_model_class(images, tmp_path):
    class LocalNet(nn.Module):  # defined inside the test: pickle cannot find it by name
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) * 0.5

    model = _train("reactnet", LocalNet())
    path = export(model, images[:4], tmp_path / "local.packed")
    torch.save(images[:32].clone(), tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(images[:32]), tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from lightning_quant import load_packed
        model = load_packed({str(path)!r})
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        ref = torch.load({str(tmp_path / "ref.pt")!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(model(x), ref), "outputs differ"
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


class _Payload:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['LQ_MARKER'], 'w').write('ran')",))


def _rewrite(src, dst, change):
    """Copy a zip archive, letting ``change(name, data)`` replace an entry's bytes (or add entries)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info.filename)))


@pytest.mark.parametrize("where", ["sample_inputs", "weight_config", "shape_expression"])
def test_load_packed_refuses_pickled_payloads_and_runs_nothing(where, images, tmp_path, monkeypatch):
    model = trained("bnn")
    good = export(model, images[:4], tmp_path / "good.packed")
    marker = tmp_path / "marker"
    monkeypatch.setenv("LQ_MARKER", str(marker))
    evil_bytes = io.BytesIO()
    torch.save(_Payload(), evil_bytes)

    def change(name, data):
        if where == "sample_inputs" and "sample_inputs" in name:
            return evil_bytes.getvalue()
        if where == "weight_config" and name.endswith("model_weights_config.json"):
            return data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
        if where == "weight_config" and name.endswith("weights/weight_0"):
            return evil_bytes.getvalue()
        if where == "shape_expression" and name.endswith("models/model.json"):
            # torch.export.load hands each expr_str to sympy.sympify, which evaluates it as Python
            payload = json.dumps(f"Symbol(open({str(marker)!r}, 'w').write('ran'))")
            return re.sub(rb'"expr_str": "[^"]*"', f'"expr_str": {payload}'.encode(), data, count=1)
        return data

    evil = tmp_path / "evil.packed"
    _rewrite(good, evil, change)
    with pytest.raises(ExportError, match="not allowed"):
        load_packed(evil)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", ["onnx", "pt2"])
def test_reactnet_to_onnx_or_pt2_is_refused_naming_its_rprelu(suffix, images, tmp_path):
    model = trained("reactnet")
    name = quantized_layers(model)[0][0]
    with pytest.raises(ExportError, match=f"'{name}': submodule 'rprelu' \\(RPReLU, ReActNet's RPReLU; export with"):
        export(model, images[:4], tmp_path / f"m.{suffix}")


def test_packed_format_refuses_a_layer_it_cannot_pack(images, tmp_path):
    model = trained("bnn")
    name, layer = quantized_layers(model)[0]
    from lightning_quant.quantizers import QuantizerConfig, build_quantizer

    layer.weight_quantizer = build_quantizer(QuantizerConfig(method="lsq", bits=4), "weight")
    with pytest.raises(ExportError, match=f"'{name}': LSQQuantizer weights are neither binary nor ternary"):
        export(model, images[:4], tmp_path / "m.packed")


def test_cli_export_of_a_reactnet_checkpoint_rebuilds_the_trained_model(images, tmp_path, capsys):
    """The CLI rebuilds the model from the checkpoint: ReLU modules must become identities and RPReLU must come
    back with its trained values, as in training, or the packed model computes something else."""
    from lightning_quant.cli import main as cli_main

    pl.seed_everything(0)
    model = ImageClassifier(epochs=1)  # the CLI's default model: DigitsCNN, whose ReLUs are modules
    trainer = quiet_trainer(
        [Binarization("reactnet", ["diagnostics.summary=false"])],
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    ckpt, out = tmp_path / "r.ckpt", tmp_path / "r.packed"
    trainer.save_checkpoint(ckpt)
    model.eval()
    rprelu = [m.rprelu for _, m in quantized_layers(model)]
    assert rprelu and any(not torch.equal(p, torch.zeros_like(p)) for r in rprelu for p in r.parameters())
    cli_main(["export", "--checkpoint", str(ckpt), "--output", str(out)])
    assert "exported reactnet (packed)" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(load_packed(out)(images), model(images))


def test_quantizer_state_for_a_module_the_model_lacks_is_refused():
    """A checkpoint entry under a module the rebuilt model does not have (an RPReLU, a quantizer) is an error,
    not silently dropped."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_quant.callbacks.base import load_quantizer_state, quantizer_state

    model = trained("reactnet")
    state = quantizer_state(model)
    state["net.1.rprelu_extra.weight"] = torch.zeros(3)
    with pytest.raises(MisconfigurationException, match="net.1.rprelu_extra.weight"):
        load_quantizer_state(model, state)


@pytest.mark.parametrize("suffix", ["onnx", "pt2"])
def test_ternary_recipes_accept_an_onnx_or_pt2_export_path(suffix, tmp_path):
    """Ternary weights export as int8 codes, so the construction-time check must not refuse them."""
    for recipe in TERNARY_RECIPES:
        assert Binarization(recipe, export_path=str(tmp_path / f"m.{suffix}")).export_path is not None


def test_a_stored_recipe_alias_bomb_is_not_expanded_in_the_mismatch_message():
    """The recipe text inside a checkpoint is read with the recipe loader's bounds before it is compared."""
    from lightning_quant.callbacks.guards import recipe_mismatch_message

    levels = ["name: x", "l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 7):  # 10^7 values once expanded
        levels.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    bomb = "\n".join(levels) + "\nweights: *l6\n"
    message = recipe_mismatch_message(bomb, load_recipe("bnn"))
    assert "could not be read" in message and len(message) < 2000
