"""Export: ONNX QDQ run by onnxruntime, the torch.export int8 program, packed binary weights, the CLI."""

import collections
import copy
import io
import os
import warnings
import zipfile

import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from torch import nn

from lightning_quant import (
    Binarization,
    ExportError,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    export,
    load_packed,
    load_program,
    load_recipe,
)
from lightning_quant.cli import main as cli_main
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier, resnet20
from lightning_quant.export import compile_int8, export_torch, int8_saturation_risk, unpack_codes
from lightning_quant.nn import quantize_model, quantized_layers
from lightning_quant.ptq import calibrate, finalize, set_quant_state
from lightning_quant.quantizers import QuantizerConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
QUICK = ["diagnostics.summary=false"]
_trainer = quiet_trainer


@pytest.fixture(scope="module")
def test_set():
    dm = DigitsDataModule(shuffle=False)
    dm.setup("test")
    x, y = zip(*dm.test_dataloader())
    return torch.cat(x), torch.cat(y)


def _onnx_logits(path, x, optimize=True):
    options = ort.SessionOptions()
    if not optimize:  # the graph as written, without onnxruntime's integer-kernel fusions
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _check_parity(model, path, x, optimize=True):
    model.eval()
    with torch.no_grad():
        ref = model(x)
    onnx.checker.check_model(onnx.load(str(path)))
    got = _onnx_logits(path, x, optimize)
    agree = (got.argmax(1) == ref.argmax(1)).float().mean()
    return ref, got, agree


def _assert_close(got, ref, agree):
    """Same grids and round-half-to-even: values differ only where float summation order moves an
    intermediate activation across a rounding boundary (one code step), which is rare."""
    assert agree >= 0.99
    assert ((got - ref).abs() < 1e-4).float().mean() >= 0.99
    assert (got - ref).abs().max() < 0.1


def test_ptq_w8a8_onnx_matches_fake_quant_model(float_model, test_set, tmp_path):
    x, _ = test_set
    model = copy.deepcopy(float_model)
    cb = PostTrainingQuantization("minmax_w8a8", overrides=[*QUICK, "layers.fold_bn=true"], num_samples=256)
    _trainer([cb]).validate(model, datamodule=DigitsDataModule(), verbose=False)
    path = export(model, x[:1], tmp_path / "ptq.onnx")
    ref, got, agree = _check_parity(model, path, x, optimize=not int8_saturation_risk())
    _assert_close(got, ref, agree)
    if int8_saturation_risk():  # AVX2 without VNNI: fused int8 kernels saturate 16-bit pair sums at W8A8
        _, _, fused_agree = _check_parity(model, path, x)
        assert fused_agree >= 0.9  # close but not exact: test_seven_bit_weights_... shows the fix
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DequantizeLinear") >= 8  # input and weight of every layer
    users = {i: n.op_type for n in graph.node for i in n.input}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert [users[c.output[0]] for c in convs][:2] == ["QuantizeLinear"] * 2  # carried back through ReLU/MaxPool
    assert users[convs[2].output[0]] == "Relu"  # the last conv feeds an average pool: not exact, left float
    int8 = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum("weight_int8" in name for name in int8) == 4  # every weight stored as int8
    weight_bytes = sum(len(i.raw_data) for i in graph.initializer if "weight_int8" in i.name)
    assert weight_bytes == sum(layer.weight.numel() for _, layer in quantized_layers(model))  # 1 byte per weight


def test_qat_lsq_w8a8_onnx_matches_fake_quant_model(float_model, test_set, tmp_path):
    x, _ = test_set
    model = copy.deepcopy(float_model)
    model.hparams.update(epochs=1)
    onnx_path = tmp_path / "qat.onnx"
    cb = QuantizationAwareTraining("lsq_w8a8", overrides=QUICK, export_path=str(onnx_path))
    _trainer([cb], max_epochs=1, limit_train_batches=5).fit(model, datamodule=DigitsDataModule())
    assert onnx_path.is_file()  # written by the callback when fit ended
    _trainer([cb]).validate(model, datamodule=DigitsDataModule(), verbose=False)  # quantizers on, as evaluation
    ref, got, agree = _check_parity(model, onnx_path, x)
    _assert_close(got, ref, agree)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _payload_bytes(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    return buffer.getvalue()


def test_torch_int8_program_is_bit_identical_and_compiles(float_model, test_set, tmp_path):
    x, _ = test_set
    model = copy.deepcopy(float_model)
    folded = [*QUICK, "layers.fold_bn=true"]  # conv + ReLU, then max-pooling: the pair is copied back
    _trainer([PostTrainingQuantization("minmax_w8a8", overrides=folded, num_samples=256)]).validate(
        model, datamodule=DigitsDataModule(), verbose=False
    )
    model.eval()
    with torch.no_grad():
        ref = model(x)
    program = export_torch(model, x[:2], tmp_path / "ptq.pt2")
    pools = [n for n in program.graph.nodes if n.target == torch.ops.aten.max_pool2d.default]
    # the next conv's input quantizer is copied back onto the ReLU before the pool: inductor pools in int8
    assert pools and all(
        p.args[0].target == torch.ops.quantized_decomposed.dequantize_per_tensor.default for p in pools
    )
    loaded = torch.export.load(str(tmp_path / "ptq.pt2"))
    checked = load_program(tmp_path / "ptq.pt2")  # the archive holds no pickled example inputs
    with torch.no_grad():
        assert torch.equal(program.module()(x), ref)
        assert torch.equal(loaded.module()(x), ref)
        assert torch.equal(checked.module()(x), ref)
    # a .pt2 with pickled example inputs (what torch.export.save writes by default) is refused, and nothing runs
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt2"
    torch.export.save(program, str(evil))
    with zipfile.ZipFile(evil) as zin, zipfile.ZipFile(tmp_path / "evil2.pt2", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, _payload_bytes(marker) if "sample_inputs" in info.filename else data)
    with pytest.raises(ExportError, match="not allowed"):
        load_program(tmp_path / "evil2.pt2")
    assert not marker.exists()
    with torch.no_grad():
        int8 = compile_int8(program)
        compiled = int8(x)  # inductor's x86 int8 lowering (oneDNN)
    hooks = [getattr(h, "__name__", "") for h in int8.compiled._orig_mod._forward_pre_hooks.values()]
    assert "_check_input_constraints_pre_hook" not in hooks  # a per-call Python check the compiled code repeats
    assert (compiled.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    import torch._inductor.config as inductor_config

    assert not inductor_config.freezing  # compile_int8 leaves no global setting behind


def test_packed_binary_weights_unpack_to_the_same_signs(float_model, test_set, tmp_path):
    x, _ = test_set
    model = ImageClassifier(DigitsCNN(width=16), optimizer="adam", lr=3e-3, epochs=1)
    model.load_state_dict(float_model.state_dict())
    path = tmp_path / "bnn.packed"
    cb = Binarization("xnor", overrides=QUICK, export_path=str(path))
    _trainer([cb], max_epochs=1, limit_train_batches=5).fit(model, datamodule=DigitsDataModule())
    model.eval()
    with torch.no_grad():
        ref = model(x)
    packed = load_packed(path)  # a torch.export program: the packed codes are its buffers
    state = packed.state_dict()
    binary = [(n, m) for n, m in quantized_layers(model) if type(m.weight_quantizer).__name__ == "XNORQuantizer"]
    assert len(binary) == 2  # first and last layer stay float
    for name, original in binary:
        expected = torch.sign(original.quantized_weight().detach())
        stored = state[f"{name}.packed_weight"]
        assert stored.dtype == torch.uint8 and stored.numel() == (expected.numel() + 7) // 8
        signs = unpack_codes(stored, 1, expected.numel()).float() * 2 - 1
        assert torch.equal(signs.reshape(expected.shape), expected)
    with torch.no_grad():
        assert torch.equal(packed(x), ref)


def test_group_wise_int4_weights_export_to_blocked_onnx(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64))
    recipe = load_recipe("rtn_w4g128", overrides=["weights.group_size=64", "layers.last_layer=same"])
    quantize_model(model, recipe.weights, recipe.activations, recipe.layers)
    x = torch.randn(3, 16, 128)
    calibrate(model, [x], lambda b: model(b))
    finalize(model)
    set_quant_state(model, weights=True, activations=True)
    path = export(model, x, tmp_path / "w4.onnx")
    graph = onnx.load(str(path)).graph
    blocks = [i for i in graph.initializer if i.name.endswith("_q")]
    assert [i.data_type for i in blocks] == [onnx.TensorProto.INT4] * 2
    assert sum(len(i.raw_data) for i in blocks) == (128 * 256 + 256 * 64) // 2  # two weights per byte
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    exact = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randn(5, 7, 128)  # batch and sequence length are dynamic
    with torch.no_grad():
        ref = model(other)
    name = exact.get_inputs()[0].name
    assert torch.allclose(torch.from_numpy(exact.run(None, {name: other.numpy()})[0]), ref, atol=1e-5)
    # onnxruntime's fused 4-bit matmul computes approximately (about 1e-2 here); cosine stays ~1
    fused_out = torch.from_numpy(fused.run(None, {name: other.numpy()})[0])
    assert torch.nn.functional.cosine_similarity(fused_out.flatten(), ref.flatten(), dim=0) > 0.999
    with pytest.raises(ExportError, match="per-group"):
        export(model, x, tmp_path / "w4.pt2")


def test_per_channel_int4_weights_halve_the_weights_and_keep_their_values(float_model, test_set, tmp_path):
    x, _ = test_set
    model = copy.deepcopy(float_model)
    overrides = [*QUICK, "layers.fold_bn=true", "weights.bits=4", "layers.last_layer=8bit"]
    cb = PostTrainingQuantization("minmax_w8a8", overrides=overrides, num_samples=256)
    _trainer([cb]).validate(model, datamodule=DigitsDataModule(), verbose=False)
    int8_path = export(model, x[:1], tmp_path / "w4_in_int8.onnx")
    int4_path = export(model, x[:1], tmp_path / "w4.onnx", int4_weights=True)
    graph8, graph4 = onnx.load(str(int8_path)).graph, onnx.load(str(int4_path)).graph
    kinds = {i.name: i.data_type for i in graph4.initializer if i.name.endswith(("weight_int4", "weight_int8"))}
    assert list(kinds.values()).count(onnx.TensorProto.INT4) == 3  # the three 4-bit convolutions
    assert kinds["net.classifier.weight_int8"] == onnx.TensorProto.INT8  # the 8-bit last layer stays int8
    codes8 = {i.name.removesuffix("_int8"): onnx.numpy_helper.to_array(i) for i in graph8.initializer}
    for init in graph4.initializer:
        if init.data_type == onnx.TensorProto.INT4 and init.name.endswith("_int4"):
            codes = onnx.numpy_helper.to_array(init).astype(np.int8)
            assert np.array_equal(codes, codes8[init.name.removesuffix("_int4")])  # the same codes
            assert len(init.raw_data) == (codes.size + 1) // 2  # two per byte
    assert os.path.getsize(int4_path) < os.path.getsize(int8_path)
    # the graphs as written compute the same thing; with onnxruntime's fusions the int4 layers run in float
    assert torch.equal(_onnx_logits(int4_path, x, optimize=False), _onnx_logits(int8_path, x, optimize=False))
    ref, got, agree = _check_parity(model, int4_path, x, optimize=not int8_saturation_risk())  # (8-bit last layer)
    _assert_close(got, ref, agree)
    with pytest.raises(ExportError, match="int4_weights"):
        export(model, x[:1], tmp_path / "w4.pt2", int4_weights=True)


def test_unexportable_layers_are_named(float_model):
    dorefa = copy.deepcopy(float_model)
    quantize_model(dorefa, QuantizerConfig(method="dorefa", bits=4), QuantizerConfig(bits=8))
    with pytest.raises(ExportError, match="DoReFa"):
        export(dorefa, torch.randn(1, 1, 8, 8), "unused.onnx")
    with pytest.raises(ExportError, match="no quantized layer"):
        export(copy.deepcopy(float_model), torch.randn(1, 1, 8, 8), "unused.onnx")
    with pytest.raises(ExportError, match="format"):
        export(float_model, torch.randn(1, 1, 8, 8), "unused.bin", format="tflite")
    assert not os.path.exists("unused.onnx")


def test_cli_fit_checkpoint_then_export(tmp_path, capsys):
    ckpt, out = tmp_path / "q.ckpt", tmp_path / "q.onnx"
    common = ["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "logs")]
    cli_main(
        ["fit", "--recipe", "minmax_w8a8", "--epochs", "1", "--float-epochs", "2", "--checkpoint", str(ckpt), *common]
    )
    assert ckpt.is_file()
    cli_main(["export", "--checkpoint", str(ckpt), "--recipe", "minmax_w8a8", "--output", str(out), "--int4-weights"])
    assert "exported minmax_w8a8 (onnx)" in capsys.readouterr().out  # 8-bit weights: nothing fits 4 bits, all int8
    x = torch.randn(5, 1, 8, 8)
    logits = _onnx_logits(out, x)
    assert logits.shape == (5, 10) and np.isfinite(logits.numpy()).all()
    with pytest.raises(SystemExit, match="suffix|format"):
        cli_main(["export", "--checkpoint", str(ckpt), "--recipe", "minmax_w8a8", "--output", str(tmp_path / "q.bin")])


def test_seven_bit_weights_stay_exact_in_int8_kernels(float_model, test_set, tmp_path):
    """AVX2 int8 kernels saturate with 8-bit weights and activations; 7-bit weights (minmax_w7a8) must not."""
    x, _ = test_set
    model = copy.deepcopy(float_model)
    _trainer([PostTrainingQuantization("minmax_w7a8", overrides=QUICK, num_samples=256)]).validate(
        model, datamodule=DigitsDataModule(), verbose=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export(model, x[:1], tmp_path / "w7a8.onnx")
    assert not [w for w in caught if "VNNI" in str(w.message)]  # no saturation warning for 7-bit weights
    ref, got, agree = _check_parity(model, path, x)
    _assert_close(got, ref, agree)
    eight = copy.deepcopy(float_model)
    _trainer([PostTrainingQuantization("minmax_w8a8", overrides=QUICK, num_samples=256)]).validate(
        eight, datamodule=DigitsDataModule(), verbose=False
    )
    if int8_saturation_risk():
        with pytest.warns(UserWarning, match="VNNI"):
            export(eight, x[:1], tmp_path / "w8a8.onnx")


def _resnet20_calibrated(x: torch.Tensor, *extra: str) -> nn.Module:
    torch.manual_seed(0)
    model = resnet20().eval()
    recipe = load_recipe(
        "minmax_w7a8", ["layers.first_layer=same", "layers.last_layer=same", "layers.fold_bn=true", *extra]
    )
    quantize_model(model, recipe.weights, recipe.activations, recipe.layers)
    calibrate(model, [x], lambda b, m=model: m(b))
    finalize(model)
    set_quant_state(model, weights=True, activations=True)
    return model


def test_output_quantizers_let_onnxruntime_run_every_conv_as_integer(tmp_path):
    """Convs feeding a residual addition keep float outputs unless their outputs are quantized too; export
    names them, and with ``layers.quantize_outputs`` onnxruntime fuses every conv into ``QLinearConv``. With the
    residual sums, the first block's input and the head quantized too, the optimized graph holds no float layer,
    as onnxruntime's own ``quantize_static`` graph."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = ["layers.quantize_outputs=['conv1','*.conv2','*.shortcut.0']"]
    whole = [
        "layers.quantize_outputs=['*.conv2','*.shortcut.0','layers.[0-8]','fc']",
        "layers.quantize_inputs=[layers.0]",
    ]
    ops = {}
    for label, extra in (("inputs only", []), ("outputs too", outputs), ("whole graph", whole)):
        model = _resnet20_calibrated(x, *extra)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = export(model, x[:1], tmp_path / f"{label}.onnx")
        named = [str(w.message) for w in caught if "keep a float output" in str(w.message)]
        if label == "inputs only":
            assert named and "'conv1'" in named[0] and "layers.0.conv2" in named[0]
        else:
            assert not named
        if label == "whole graph":  # blocks, not layers: applied by hooks
            assert {"input_quantizer", "output_quantizer"} <= set(model.layers[0]._modules)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{label}.optimized.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        ops[label] = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
        with torch.no_grad():
            ref = model(x)
        # the same grids; where float summation order moves a value across a rounding boundary, one code flips,
        # so the arg-max must agree only where the reference's top-two margin exceeds the largest difference
        error = (got - ref).abs().max()
        assert error < 0.01 * ref.abs().max()
        top2 = ref.topk(2, dim=1).values
        decided = top2[:, 0] - top2[:, 1] > 2 * error
        assert decided.float().mean() >= 0.5 and torch.equal(got.argmax(1)[decided], ref.argmax(1)[decided])
    convs = sum(isinstance(m, nn.Conv2d) for m in resnet20().modules())
    fused = {k: v["QLinearConv"] for k, v in ops.items()}
    assert fused["outputs too"] == fused["whole graph"] == convs > fused["inputs only"]
    assert ops["inputs only"]["QLinearAdd"] == ops["outputs too"]["QLinearAdd"] == 0
    whole_ops = ops["whole graph"]
    assert whole_ops["QLinearAdd"] == 9 and whole_ops["QGemm"] == 1  # every residual sum, and the head
    assert not {"Conv", "Add", "Relu", "Gemm"} & set(whole_ops)  # no float layer, no leftover requantization
    assert whole_ops["QuantizeLinear"] == whole_ops["DequantizeLinear"] == 2  # the model input; the pooling


def test_torch_program_skips_requantization_between_equal_grids():
    """A block quantizer next to a layer's input quantizer on the same grid leaves no dequantize → quantize pair
    in the exported program (inductor would spend a pass on it and miss its conv + add + ReLU int8 fusion), and
    the program still computes exactly what the fake-quant model computes."""
    x = torch.randn(16, 3, 32, 32)
    model = _resnet20_calibrated(
        x, "layers.quantize_outputs=['*.shortcut.0','layers.[0-8]']", "layers.quantize_inputs=[layers.0]"
    )
    program = export_torch(model, x[:2])
    ops = torch.ops.quantized_decomposed
    nodes = list(program.graph.nodes)
    quantize = [n for n in nodes if n.target == ops.quantize_per_tensor.default]
    assert not [n for n in quantize if getattr(n.args[0], "target", None) == ops.dequantize_per_tensor.default]
    # the model input, the first block's input, 9 blocks' inner and output tensors, 2 shortcut outputs, the head
    assert len(quantize) == 1 + 1 + 9 + 9 + 2 + 1
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))
