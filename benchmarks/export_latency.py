"""Exported models: file size, CPU latency ratio int8/float (batch 1 and 64) and accuracy, per runtime.

Models: the digits demo CNN (trained here, real test accuracy), a ResNet-20 (random weights: no CIFAR here,
so its row reports agreement with its own fake-quantized model) and MiniLM's 12 feed-forward Linear layers
(real weights, 128-token sequences; agreement reported as cosine similarity to float). Each is quantized
with the same PostTrainingQuantization recipe (min-max, BN folded; ``--weight-bits`` weights, 7 by default
because this CPU has no VNNI (see BENCHMARKS.md), 8-bit activations) and exported by lightning-quant:

* onnxruntime: our QDQ ONNX file against the float ONNX file of the same model (each runtime's own float
  is the reference), and against onnxruntime's own ``quantize_static`` (QDQ, the same calibration data);
* PyTorch: our ``torch.export`` int8 program compiled by inductor (freezing) against the float model
  compiled the same way.

Latency: A and B alternate (A B A B ...) after a warm-up, ``torch.set_num_threads(2)`` and 2 onnxruntime
threads; the table gives the median ratio with min-max.

    python benchmarks/export_latency.py [--rounds 15] [--models digits resnet20 minilm]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_quant import PostTrainingQuantization, export
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier, resnet20
from lightning_quant.export import compile_int8, export_torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, interleaved_ratios, quiet_trainer  # noqa: E402

RECIPE = ["layers.fold_bn=true", "layers.first_layer=same", "layers.last_layer=same", "diagnostics.summary=false"]
# Boundary quantizers per runtime, (layers.quantize_outputs, layers.quantize_inputs): "whole graph" variants.
# onnxruntime: the outputs `export` names in its warning (they feed a residual addition, pooling or a GELU),
# and for ResNet-20 every tensor onnxruntime's own graph quantizes (residual sums, the first block's input, the
# head). PyTorch/inductor fuses conv + residual add + ReLU itself, so there the conv outputs stay float and only
# the residual sums, shortcut outputs and the first block's input are quantized; the other models gain
# nothing from boundary quantizers in PyTorch and run as in the "ours" column.
BOUNDARIES = {
    "onnxruntime": {
        "digits": (["net.features.7"], []),
        "resnet20": (["*.conv2", "*.shortcut.0", "net.layers.[0-8]", "net.fc"], ["net.layers.0"]),
        "minilm": ([f"net.{3 * i}" for i in range(6)], []),
    },
    "torch": {"resnet20": (["*.shortcut.0", "net.layers.[0-8]"], ["net.layers.0"])},
}


class Wrapped(pl.LightningModule):
    """Any nn.Module as a LightningModule (the callback needs one)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def minilm_ffn() -> nn.Module:
    """The 6 feed-forward pairs (384→1536, GELU, 1536→384) of all-MiniLM-L6-v2 with their real weights."""
    from lightning_quant.examples.text import SentenceEncoder

    encoder = SentenceEncoder.from_minilm().model
    layers: list[nn.Module] = []
    for block in encoder.encoder.layer:
        layers += [copy.deepcopy(block.intermediate.dense), nn.GELU(), copy.deepcopy(block.output.dense)]
    return nn.Sequential(*layers)


def build(name: str) -> tuple[pl.LightningModule, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(float model, calibration inputs, evaluation inputs, labels or None, batch-64 multiplier)."""
    g = torch.Generator().manual_seed(0)
    if name == "digits":
        pl.seed_everything(0)
        model = ImageClassifier(DigitsCNN(width=32), optimizer="adam", lr=3e-3, epochs=20)
        quiet_trainer([], epochs=20).fit(model, datamodule=DigitsDataModule())
        dm = DigitsDataModule(shuffle=False)
        dm.setup("fit")
        calib = torch.cat([b[0] for b in dm.train_dataloader()])[:512]
        x, y = zip(*dm.test_dataloader())
        return model, calib, torch.cat(x), torch.cat(y), 1
    if name == "resnet20":
        torch.manual_seed(0)
        model = Wrapped(resnet20())
        model.eval()
        with torch.no_grad():  # give BatchNorm non-trivial statistics
            model.train()
            for _ in range(5):
                model(torch.randn(64, 3, 32, 32, generator=g))
        return model, torch.randn(256, 3, 32, 32, generator=g), torch.randn(256, 3, 32, 32, generator=g), None, 1
    model = Wrapped(minilm_ffn())
    calib = torch.randn(64, 128, 384, generator=g)
    return model, calib, torch.randn(64, 128, 384, generator=g), None, 1


def quantize(
    model: pl.LightningModule,
    calib: torch.Tensor,
    recipe: str = "minmax_w8a8",
    outputs: tuple[str, ...] = (),
    inputs: tuple[str, ...] = (),
) -> pl.LightningModule:
    qmodel = copy.deepcopy(model)
    loader = [calib[i : i + 32] for i in range(0, len(calib), 32)]
    overrides = RECIPE if recipe == "minmax_w8a8" else ["layers.last_layer=same", "diagnostics.summary=false"]
    for key, globs in (("quantize_outputs", outputs), ("quantize_inputs", inputs)):
        if globs:
            overrides = [*overrides, f"layers.{key}=[" + ",".join(f"'{g}'" for g in globs) + "]"]
    cb = PostTrainingQuantization(recipe, overrides=overrides, calibration_dataloader=loader, compare_float=False)
    trainer = quiet_trainer([cb])
    cb.setup(trainer, qmodel, "validate")
    cb.quantize(trainer, qmodel)
    return qmodel.eval()


def ort_session(path: Path, fold_weights: bool = False):  # noqa: ANN201
    """An onnxruntime session on 2 threads; ``fold_weights``: QDQ-aware passes off, so constant folding
    dequantizes weight initializers once at load (INT4 weights then run at float speed)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    # no busy-waiting between runs: interleaved sessions would otherwise steal each other's cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if fold_weights:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def float_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(  # the opset of lightning_quant's export (20: a single Gelu op)
            copy.deepcopy(model).eval(), (example,), dynamo=True, verbose=False, opset_version=20,
            dynamic_shapes=(dict.fromkeys(range(example.dim()), torch.export.Dim.AUTO),),
        )  # fmt: skip
    program.save(str(path))


def ort_static(float_path: Path, calib: torch.Tensor, out: Path) -> None:
    """onnxruntime's own QDQ static quantization (per-channel int8 weights, uint8 activations, min-max)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(float_path), str(pre))
    name = ort_session(float_path).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: calib[i : i + 32].numpy()} for i in range(0, len(calib), 32)])

        def get_next(self):  # noqa: ANN202
            return next(self.items, None)

    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip


def torchao_pt2e(model: nn.Module, calib: torch.Tensor, example: torch.Tensor):  # noqa: ANN201
    """torchao's pt2e flow on the float model: X86InductorQuantizer defaults, the same calibration data."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    dims = (dict.fromkeys(range(example.dim()), torch.export.Dim.AUTO),)
    graph = torch.export.export(copy.deepcopy(model).eval(), (example,), dynamic_shapes=dims).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(0, len(calib), 32):
            prepared(calib[i : i + 32])
    return torch.compile(convert_pt2e(prepared), dynamic=False)


def run(name: str, rounds: int, tmp: Path) -> list[str]:
    model, calib, x, y, _ = build(name)
    model.eval()
    qmodel = quantize(model, calib)
    outputs, inputs = BOUNDARIES["onnxruntime"][name]
    qout = quantize(model, calib, outputs=tuple(outputs), inputs=tuple(inputs))
    outputs, inputs = BOUNDARIES["torch"].get(name, ([], []))
    qtorch = quantize(model, calib, outputs=tuple(outputs), inputs=tuple(inputs)) if outputs or inputs else qmodel
    with torch.no_grad():
        ref_float, ref_q, ref_qout, ref_qtorch = model(x), qmodel(x), qout(x), qtorch(x)
    rows = []
    paths = {
        "float": tmp / f"{name}_float.onnx",
        "ours": tmp / f"{name}_int8.onnx",
        "ours+out": tmp / f"{name}_int8_outputs.onnx",
        "ort": tmp / f"{name}_ort.onnx",
    }
    float_onnx(model, x[:1], paths["float"])
    export(qmodel, x[:1], paths["ours"])
    export(qout, x[:1], paths["ours+out"])
    ort_static(paths["float"], calib, paths["ort"])
    sessions = {k: ort_session(p) for k, p in paths.items()}

    def quality(out: torch.Tensor) -> str:
        if y is not None:
            return f"acc {100 * float((out.argmax(1) == y).float().mean()):.2f}%"
        if out.dim() == 2:
            return f"agree {100 * float((out.argmax(1) == ref_q.argmax(1)).float().mean()):.1f}%"
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref_float.flatten(1)).mean()
        return f"cos {float(cos):.4f}"

    def ort_run(key: str, inp: torch.Tensor) -> torch.Tensor:
        s = sessions[key]
        return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: inp.numpy()})[0])

    sizes = {k: p.stat().st_size / 1024 for k, p in paths.items()}
    results = {k: quality(ort_run(k, x)) for k in paths}
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # all three compiled the same way: freezing, one static graph per shape
    torch_float = torch.compile(copy.deepcopy(model).eval(), dynamic=False)
    torch_int8 = compile_int8(export_torch(qmodel, x[:2]), dynamic=False)
    torch_int8_out = compile_int8(export_torch(qtorch, x[:2]), dynamic=False)
    torchao_int8 = torchao_pt2e(model, calib, x[:2])
    with torch.no_grad():
        results["torch float"] = quality(torch_float(x))
        results["torch int8"] = quality(torch_int8(x))
        results["torch int8, whole graph"] = quality(torch_int8_out(x))
        results["fake-quant, whole graph (onnxruntime)"] = quality(ref_qout)
        results["fake-quant, whole graph (torch)"] = quality(ref_qtorch)
        results["torchao pt2e"] = quality(torchao_int8(x))
        results["fake-quant"] = quality(ref_q)
        results["float"] = quality(ref_float)
    pt2 = tmp / f"{name}.pt2"
    export_torch(qmodel, x[:2], pt2)
    state_kb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1024
    for batch in (1, 64):
        inp = x[:batch] if len(x) >= batch else x.repeat(batch // len(x) + 1, *([1] * (x.dim() - 1)))[:batch]
        with torch.no_grad():
            ratios = interleaved_ratios(
                {
                    "ort float": lambda: ort_run("float", inp),
                    "ort ours": lambda: ort_run("ours", inp),
                    "ort ours+out": lambda: ort_run("ours+out", inp),
                    "ort static": lambda: ort_run("ort", inp),
                },
                baseline="ort float",
                rounds=rounds,
            )
            tratios = interleaved_ratios(
                {
                    "torch float": lambda: torch_float(inp),
                    "torch int8": lambda: torch_int8(inp),
                    "torch int8+out": lambda: torch_int8_out(inp),
                    "torchao": lambda: torchao_int8(inp),
                },
                baseline="torch float",
                rounds=rounds,
            )
        fmt = "{:.2f} ({:.2f}-{:.2f})".format
        rows.append(
            f"| {name} | {batch} | {fmt(*ratios['ort ours'])} | {fmt(*ratios['ort ours+out'])} "
            f"| {fmt(*ratios['ort static'])} | {fmt(*tratios['torch int8'])} | {fmt(*tratios['torch int8+out'])} "
            f"| {fmt(*tratios['torchao'])} |"
        )
    if name == "minilm":  # weight-only int4 blocks (RTN W4 g128): onnxruntime's 4-bit matmul path
        w4 = quantize(model, calib, "rtn_w4g128")
        export(w4, x[:1], tmp / "minilm_w4.onnx")
        sessions["w4"] = ort_session(tmp / "minilm_w4.onnx")
        results["ORT W4g128"] = quality(ort_run("w4", x))
        sizes["w4"] = (tmp / "minilm_w4.onnx").stat().st_size / 1024
        for batch in (1, 64):
            inp = x[:batch]
            r = interleaved_ratios(
                {"f": lambda: ort_run("float", inp), "w4": lambda: ort_run("w4", inp)}, "f", rounds=rounds
            )["w4"]
            rows.append(f"| minilm W4g128 weight-only (ORT) | {batch} | {r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f}) | | | | | |")
        rows.append(f"<!-- minilm int4 ONNX file {sizes['w4']:.0f} KB -->")
    info = (
        f"{name}: file KB float ONNX {sizes['float']:.0f}, ours int8 ONNX {sizes['ours']:.0f} "
        f"(whole graph {sizes['ours+out']:.0f}), ORT static "
        f"{sizes['ort']:.0f}, ours .pt2 {pt2.stat().st_size / 1024:.0f} (float state dict {state_kb:.0f}); "
        + ", ".join(f"{k}: {v}" for k, v in results.items())
    )
    return [*rows, info]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=["digits", "resnet20", "minilm"])
    parser.add_argument("--weight-bits", type=int, default=7, help="7: exact on AVX2 int8 kernels (no VNNI)")
    args = parser.parse_args()
    RECIPE.append(f"weights.bits={args.weight_bits}")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    print(header("python benchmarks/export_latency.py " + " ".join(sys.argv[1:])))
    import onnxruntime

    print(
        f"onnxruntime {onnxruntime.__version__}; latency ratio int8/float, median (min-max) over {args.rounds} rounds\n"
    )
    table = [
        "| model | batch | ORT: ours QDQ / ORT float | ORT: ours, whole graph | ORT: quantize_static / ORT float "
        "| torch: ours int8 / float (compiled) | torch: ours, whole graph | torch: torchao pt2e / float "
        "(compiled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            out = run(name, args.rounds, Path(tmp))
            table += [r for r in out[:-1] if not r.startswith("<!--")]
            notes += [r[5:-4] for r in out[:-1] if r.startswith("<!--")]
            notes.append(out[-1])
            print(f"done {name}", file=sys.stderr, flush=True)
    print("\n".join(table))
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
