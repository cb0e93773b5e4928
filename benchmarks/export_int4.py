"""4-bit weights in ONNX: int8 containers against INT4 storage (``export(..., int4_weights=True)``).

The models and calibration of ``export_latency.py`` (digits demo CNN trained here, a ResNet-20 with random
weights, MiniLM's 12 feed-forward Linear layers), quantized by PostTrainingQuantization at W4A8: min-max,
4-bit symmetric per-channel weights on every layer, 8-bit activations, BatchNorm folded. Each is exported twice,
with its 4-bit codes in int8 initializers and in INT4 ones, and run by onnxruntime. The table gives file sizes,
quality against the fake-quant model (digits: test accuracy; ResNet-20: agreement of predictions; MiniLM:
cosine to float) and the latency ratio to the float ONNX file, interleaved, median (min-max). "INT4 folded" is
the INT4 file in a session with ``session.disable_quant_qdq=1``, where constant folding dequantizes the weights
once at load.

    python benchmarks/export_int4.py [--rounds 11] [--models digits resnet20 minilm]
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

import torch

from lightning_quant import PostTrainingQuantization, export

sys.path.insert(0, os.path.dirname(__file__))
from common import header, interleaved_ratios, quiet_trainer  # noqa: E402
from export_latency import build, float_onnx, ort_session  # noqa: E402

W4A8 = [
    "weights.bits=4",
    "layers.fold_bn=true",
    "layers.first_layer=same",
    "layers.last_layer=same",
    "diagnostics.summary=false",
]


def quantize_w4a8(model: torch.nn.Module, calib: torch.Tensor) -> torch.nn.Module:
    qmodel = copy.deepcopy(model)
    loader = [calib[i : i + 32] for i in range(0, len(calib), 32)]
    cb = PostTrainingQuantization("minmax_w8a8", overrides=W4A8, calibration_dataloader=loader, compare_float=False)
    trainer = quiet_trainer([cb])
    cb.setup(trainer, qmodel, "validate")
    cb.quantize(trainer, qmodel)
    return qmodel.eval()


def run(name: str, rounds: int, tmp: Path) -> list[str]:
    model, calib, x, y, _ = build(name)
    model.eval()
    qmodel = quantize_w4a8(model, calib)
    paths = {"float": tmp / f"{name}_float.onnx", "int8": tmp / f"{name}_w4_int8.onnx", "int4": tmp / f"{name}_w4.onnx"}
    float_onnx(model, x[:1], paths["float"])
    export(qmodel, x[:1], paths["int8"])
    export(qmodel, x[:1], paths["int4"], int4_weights=True)
    sessions = {k: ort_session(p) for k, p in paths.items()}
    # with onnxruntime's QDQ-aware passes off, constant folding dequantizes the INT4 weights once, at load
    sessions["int4 folded"] = ort_session(paths["int4"], fold_weights=True)

    def ort_run(key: str, inp: torch.Tensor) -> torch.Tensor:
        s = sessions[key]
        return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: inp.numpy()})[0])

    with torch.no_grad():
        ref_float, ref_q = model(x), qmodel(x)

    def quality(out: torch.Tensor) -> str:
        if y is not None:
            return f"acc {100 * float((out.argmax(1) == y).float().mean()):.2f}%"
        if out.dim() == 2:
            return f"agree {100 * float((out.argmax(1) == ref_q.argmax(1)).float().mean()):.1f}%"
        return f"cos {float(torch.nn.functional.cosine_similarity(out.flatten(1), ref_float.flatten(1)).mean()):.4f}"

    sizes = {k: p.stat().st_size / 1024 for k, p in paths.items()}
    fmt = "{:.2f} ({:.2f}-{:.2f})".format
    latency = {}
    for batch in (1, 64):
        inp = x[:batch]
        ratios = interleaved_ratios({k: (lambda k=k: ort_run(k, inp)) for k in sessions}, "float", rounds=rounds)
        latency[batch] = " / ".join(fmt(*ratios[k]) for k in ("int8", "int4", "int4 folded"))
    return [
        f"| {name} | {sizes['float']:.0f} | {sizes['int8']:.0f} | {sizes['int4']:.0f} "
        f"| {quality(ref_float)} / {quality(ref_q)} / {quality(ort_run('int8', x))} / {quality(ort_run('int4', x))} "
        f"| {latency[1]} | {latency[64]} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--models", nargs="+", default=["digits", "resnet20", "minilm"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    print(header("python benchmarks/export_int4.py " + " ".join(sys.argv[1:])))
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}; W4A8 min-max PTQ, latency ratio to the float ONNX file\n")
    table = [
        "| model | float KB | W4 in int8 KB | W4 in INT4 KB | quality: float / fake-quant / ORT int8 / ORT INT4 "
        "| batch 1: int8 / INT4 / INT4 folded | batch 64: int8 / INT4 / INT4 folded |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            table += run(name, args.rounds, Path(tmp))
            print(f"done {name}", file=sys.stderr, flush=True)
    print("\n".join(table))


if __name__ == "__main__":
    main()
