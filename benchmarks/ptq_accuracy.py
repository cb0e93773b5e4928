"""Post-training quantization on the digits demo: min-max, MSE, AdaRound, BRECQ, QDrop and Bit-Split side by side.

For each seed one float model is trained (20 epochs, Adam); every method quantizes a copy of that same
model through the PostTrainingQuantization callback, calibrating on 1024 samples drawn (with the seed)
from the training split. Test data is only used for the final evaluation: accuracy, and the SQNR of the
quantized model's test-set logits against the float model's (a continuous measure, finer than the 360-image
test accuracy, where one image is 0.28 points). Reconstruction runs ``--iters``
iterations per unit (the papers use 20k; see BENCHMARKS.md for what that changes).

    python benchmarks/ptq_accuracy.py [--seeds 0 1 2] [--iters 2000] [--bits 4/4 2/4 3/3 2/2]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings

import lightning.pytorch as pl
import torch

from lightning_quant import PostTrainingQuantization
from lightning_quant.examples import DigitsDataModule, ImageClassifier

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, quiet_trainer  # noqa: E402

# method -> (recipe it starts from, overrides); bits are set per configuration
METHODS = {
    "min-max (nearest)": ("mse_w4a8", ["weights.observer=minmax", "activations.observer=minmax"]),
    "MSE (nearest)": ("mse_w4a8", []),
    "MSE, symmetric weights (nearest)": ("mse_w4a8", ["weights.symmetric=true"]),
    "AdaRound": ("adaround_w4a8", []),
    "BRECQ": ("brecq_w4a4", []),
    "QDrop": ("qdrop_w4a4", []),
    "Bit-Split": ("bitsplit_w4a8", []),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--bits", nargs="+", default=["4/4", "2/4", "3/3", "2/2"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    acc: dict[tuple[str, str], list[float]] = {}
    secs: dict[tuple[str, str], list[float]] = {}
    sqnr: dict[tuple[str, str], list[float]] = {}  # test-set logits against the float model's, dB
    floats: list[float] = []
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        dm = DigitsDataModule(batch_size=64)
        base = ImageClassifier(optimizer="adam", lr=0.01, epochs=20)
        quiet_trainer([], 20).fit(base, datamodule=dm)
        floats.append(float(quiet_trainer([]).test(base, datamodule=dm, verbose=False)[0]["test_acc"]))
        for bits in args.bits:
            w, a = bits.split("/")
            for method in args.methods:
                recipe, extra = METHODS[method]
                overrides = [*extra, f"weights.bits={w}", f"activations.bits={a}", "diagnostics.summary=false"]
                iters = None if method == "Bit-Split" else args.iters  # Bit-Split runs ptq.sweeps, not iterations
                cb = PostTrainingQuantization(recipe, overrides, iters=iters, seed=seed, compare_float=True)
                model = copy.deepcopy(base)
                start = time.perf_counter()
                result = quiet_trainer([cb]).test(model, datamodule=dm, verbose=False)[0]
                secs.setdefault((bits, method), []).append(time.perf_counter() - start)
                acc.setdefault((bits, method), []).append(float(result["test_acc"]))
                sqnr.setdefault((bits, method), []).append(cb.last_comparison["output_sqnr_db"])
                print(
                    f"seed {seed} W{w}A{a} {method}: {100 * acc[(bits, method)][-1]:.2f}", file=sys.stderr, flush=True
                )
    print(header("python benchmarks/ptq_accuracy.py " + " ".join(sys.argv[1:])))
    fmean = statistics.mean(floats)
    fstd = statistics.stdev(floats) if len(floats) > 1 else 0.0
    print(f"\nfloat model: {100 * fmean:.2f} ± {100 * fstd:.2f} % test accuracy ({len(floats)} seeds)")
    print(f"reconstruction: {args.iters} iterations per unit, batch 32, 1024 calibration samples\n")
    print(
        "| W/A | method | test acc % (mean ± std) | min–max | Δ vs float (points) "
        "| logit SQNR dB vs float (mean ± std) | wall time s (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for bits in args.bits:
        for method in args.methods:
            v = acc[(bits, method)]
            mean = statistics.mean(v)
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            print(
                f"| {bits} | {method} | {100 * mean:.2f} ± {100 * std:.2f} | {100 * min(v):.2f}–{100 * max(v):.2f} "
                f"| {100 * (mean - fmean):+.2f} | {statistics.mean(sqnr[(bits, method)]):.2f} ± "
                f"{statistics.stdev(sqnr[(bits, method)]) if len(v) > 1 else 0.0:.2f} "
                f"| {statistics.median(secs[(bits, method)]):.1f} |"
            )


if __name__ == "__main__":
    main()
