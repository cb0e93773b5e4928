"""PTQ against torch's own post-training quantization: W8A8 accuracy, calibration cost and reconstruction time.

Part 1 (digits demo, 3 seeds): the same float model calibrated on 1024 training samples by our observers
(fake-quantized evaluation) and by torch.ao's eager flow (x86 default qconfig: histogram activations,
per-channel min-max weights; fused conv-bn-relu, prepare, calibrate, convert, real int8 kernels).
Part 2: calibration cost as a multiple of a plain float forward pass over the same 1024 samples, timed
interleaved (A B C ... A B C ...) after a warm-up, on the digits CNN and a ResNet-20 (random weights
and 3x32x32 inputs; cost does not depend on the values).
Part 3: wall time of each reconstruction method with a stated iteration count per unit.

    python benchmarks/ptq_cost.py [--seeds 0 1 2] [--rounds 7] [--iters 200]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.ao.quantization as tq
from torch import nn

from lightning_quant import PostTrainingQuantization, load_recipe, quantize_model
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier, resnet20
from lightning_quant.ptq import ALGORITHMS, calibrate, finalize, set_quant_state

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, interleaved_ratios, quiet_trainer  # noqa: E402

OURS_W8A8 = {
    "min-max": ["weights.observer=minmax", "activations.observer=minmax"],
    "percentile 99.99": ["weights.observer=minmax", "activations.observer=percentile"],
    "MSE": [],
    "KL (entropy)": ["weights.observer=minmax", "activations.observer=kl"],
}
W8A8 = ["weights.bits=8", "activations.bits=8", "layers.first_layer=same", "layers.last_layer=same"]


def _calibration_batches(dm: DigitsDataModule, seed: int, n: int = 1024) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    out, seen = [], 0
    for x, _ in dm.train_dataloader():
        out.append(x[: n - seen])
        seen += out[-1].shape[0]
        if seen >= n:
            break
    return out


def torch_ao_digits(net: DigitsCNN, batches: list[torch.Tensor]) -> tuple[nn.Module, float]:
    """torch.ao eager post-training static quantization of the digits CNN (fused, x86 qconfig)."""
    model = nn.Sequential(tq.QuantStub(), copy.deepcopy(net), tq.DeQuantStub()).eval()
    tq.fuse_modules(
        model,
        [[f"1.features.{i}", f"1.features.{i + 1}", f"1.features.{i + 2}"] for i in (0, 3, 7)],
        inplace=True,
    )
    model.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(model, inplace=True)
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    seconds = time.perf_counter() - start
    tq.convert(model, inplace=True)
    return model, seconds


def accuracy(model: nn.Module, dm: DigitsDataModule) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += int((model(x).argmax(-1) == y).sum())
            total += y.numel()
    return correct / total


def part1(seeds: list[int]) -> None:
    acc: dict[str, list[float]] = {}
    secs: dict[str, list[float]] = {}
    floats = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        dm = DigitsDataModule(batch_size=64)
        base = ImageClassifier(optimizer="adam", lr=0.01, epochs=20)
        quiet_trainer([], 20).fit(base, datamodule=dm)
        base.eval()
        floats.append(accuracy(base, dm))
        for name, extra in OURS_W8A8.items():
            cb = PostTrainingQuantization("mse_w4a8", [*extra, *W8A8, "diagnostics.summary=false"], seed=seed)
            model = copy.deepcopy(base)
            acc.setdefault(f"lightning-quant {name}", []).append(
                float(quiet_trainer([cb]).test(model, datamodule=dm, verbose=False)[0]["test_acc"])
            )
            secs.setdefault(f"lightning-quant {name}", []).append(cb.timings["calibration_s"])
        int8, seconds = torch_ao_digits(base.net, _calibration_batches(dm, seed))
        acc.setdefault("torch.ao eager int8 (x86: histogram)", []).append(accuracy(int8, dm))
        secs.setdefault("torch.ao eager int8 (x86: histogram)", []).append(seconds)
    fmean = statistics.mean(floats)
    print(f"\nfloat: {100 * fmean:.2f} % test accuracy, {len(seeds)} seeds; W8A8, 1024 calibration samples\n")
    print("| method | test acc % (mean ± std) | Δ vs float (points) | calibration s (median) |")
    print("|---|---|---|---|")
    for name, v in acc.items():
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        print(
            f"| {name} | {100 * statistics.mean(v):.2f} ± {100 * std:.2f} | {100 * (statistics.mean(v) - fmean):+.2f} "
            f"| {statistics.median(secs[name]):.2f} |"
        )


def _ours_calibration(net: nn.Module, batches: list[torch.Tensor], extra: list[str]) -> Callable[[], None]:
    model = copy.deepcopy(net).eval()
    r = load_recipe("mse_w4a8", [*extra, *W8A8])
    quantize_model(model, r.weights, r.activations, r.layers)

    def run() -> None:
        calibrate(model, batches, lambda b: model(b))
        finalize(model)

    return run


def _ao_calibration(net: nn.Module, batches: list[torch.Tensor], qconfig: tq.QConfig) -> Callable[[], None]:
    model = copy.deepcopy(net).eval()
    model.qconfig = qconfig
    tq.prepare(model, inplace=True)

    def run() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)

    return run


def part2(rounds: int) -> None:
    cases = {
        "digits CNN (1024 x 1x8x8, batch 64)": (DigitsCNN().eval(), torch.randn(1024, 1, 8, 8).split(64)),
        "ResNet-20 (1024 x 3x32x32, batch 64)": (resnet20().eval(), torch.randn(1024, 3, 32, 32).split(64)),
    }
    minmax_qconfig = tq.QConfig(
        activation=tq.MinMaxObserver.with_args(reduce_range=True),
        weight=tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    print("\n| model | calibration | time / float forward pass (median) | min–max |")
    print("|---|---|---|---|")
    for label, (net, batches) in cases.items():
        batches = list(batches)

        def float_pass(net: nn.Module = net, batches: list = batches) -> None:
            with torch.no_grad():
                for x in batches:
                    net(x)

        fns = {
            "float forward": float_pass,
            "lightning-quant min-max": _ours_calibration(net, batches, OURS_W8A8["min-max"]),
            "lightning-quant KL (histogram)": _ours_calibration(net, batches, OURS_W8A8["KL (entropy)"]),
            "lightning-quant MSE": _ours_calibration(net, batches, OURS_W8A8["MSE"]),
            "torch.ao min-max": _ao_calibration(net, batches, minmax_qconfig),
            "torch.ao histogram (x86 default)": _ao_calibration(net, batches, tq.get_default_qconfig("x86")),
        }
        for name, (med, lo, hi) in interleaved_ratios(fns, "float forward", rounds=rounds, warmup=1).items():
            if name != "float forward":
                print(f"| {label} | {name} | {med:.2f}x | {lo:.2f}–{hi:.2f} |", flush=True)


def part3(iters: int) -> None:
    cases = {
        "digits CNN": (DigitsCNN().eval(), list(torch.randn(1024, 1, 8, 8).split(64))),
        "ResNet-20": (resnet20().eval(), list(torch.randn(1024, 3, 32, 32).split(64))),
    }
    print(f"\n| model | method | units | wall time s ({iters} iterations per unit) | s per 1k iterations per unit |")
    print("|---|---|---|---|---|")
    for label, (net, batches) in cases.items():
        for name, recipe in (
            ("AdaRound", "adaround_w4a8"),
            ("BRECQ", "brecq_w4a4"),
            ("QDrop", "qdrop_w4a4"),
            ("Bit-Split", "bitsplit_w4a8"),
        ):
            model = copy.deepcopy(net)
            r = load_recipe(recipe, [f"ptq.iters={iters}"] if name != "Bit-Split" else [])  # Bit-Split has sweeps
            quantize_model(model, r.weights, r.activations, r.layers)
            calibrate(model, batches, lambda b, m=model: m(b))
            finalize(model)
            set_quant_state(model, True, True)
            start = time.perf_counter()
            curves = ALGORITHMS[r.ptq.algorithm].handler(model, batches, lambda b, m=model: m(b), r.ptq, None)
            seconds = time.perf_counter() - start
            units = len([k for k in curves if not k.endswith("(activations)")])
            per_k = "-" if name == "Bit-Split" else f"{seconds / units / iters * 1000:.1f}"
            print(f"| {label} | {name} | {units} | {seconds:.1f} | {per_k} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    print(header("python benchmarks/ptq_cost.py " + " ".join(sys.argv[1:])))
    if 1 in args.parts:
        part1(args.seeds)
    if 2 in args.parts:
        part2(args.rounds)
    if 3 in args.parts:
        part3(args.iters)


if __name__ == "__main__":
    main()
