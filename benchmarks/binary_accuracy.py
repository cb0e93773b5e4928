"""Binary, ternary and INQ training on the digits demo: accuracy over 3 seeds, packed size, step-time ratio.

For each seed one float model is trained (20 epochs, Adam); every recipe trains a copy of that same model
with its own training settings (binary recipes: Adam 5e-3, 15 epochs; INQ: SGD 0.01, 8 epochs, stages at
epochs 0/2/4/6). Test data is only used for the final evaluation. The step-time table times one training
step (forward, loss, backward, update) of each method against the float model, interleaved in one run.

    python benchmarks/binary_accuracy.py [--seeds 0 1 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_quant import Binarization, IncrementalQuantization, load_recipe, quantize_model, summarize
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, interleaved_ratios, quiet_trainer  # noqa: E402

BINARY = ["binaryconnect", "bnn", "xnor", "bireal", "irnet", "reactnet", "sketch_m3", "twn", "ttq"]
INQ = ["inq_5bit", "inq_4bit", "inq_3bit", "elq_ternary", "elq_binary"]


def step_times(rounds: int) -> None:
    torch.manual_seed(0)
    net = DigitsCNN()
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    steps = {}
    for name in ["float", *BINARY]:
        model = copy.deepcopy(net).train()
        if name != "float":
            r = load_recipe(name)
            quantize_model(model, r.weights, r.activations, r.layers)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        steps[name] = step
    print("\n| method | training step / float step (median) | min–max |")
    print("|---|---|---|")
    for name, (med, lo, hi) in interleaved_ratios(steps, "float", rounds=rounds).items():
        if name != "float":
            print(f"| {name} | {med:.2f}x | {lo:.2f}–{hi:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=BINARY + INQ)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    acc: dict[str, list[float]] = {"float": []}
    size: dict[str, str] = {}
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        dm = DigitsDataModule(batch_size=64)
        base = ImageClassifier(optimizer="adam", lr=0.01, epochs=20)
        quiet_trainer([], 20).fit(base, datamodule=dm)
        acc["float"].append(float(quiet_trainer([], 1).test(base, datamodule=dm, verbose=False)[0]["test_acc"]))
        for name in args.recipes:
            recipe = load_recipe(name, ["diagnostics.summary=false"])
            tr = recipe.training
            model = copy.deepcopy(base)
            model.hparams.update(
                optimizer=tr.optimizer, lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay, epochs=tr.epochs
            )
            cb = IncrementalQuantization(recipe) if recipe.kind == "inq" else Binarization(recipe)
            pl.seed_everything(seed, verbose=False)
            trainer = quiet_trainer([cb], tr.epochs)
            trainer.fit(model, datamodule=dm)
            acc.setdefault(name, []).append(float(trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]))
            if recipe.kind == "inq":
                size[name] = f"{recipe.weights.bits}-bit codes for conv/linear weights"
            else:
                s = summarize(model, model.example_input_array)
                size[name] = f"{s.size_mb * 1e3:.1f} KB ({s.float_memory_bits / s.memory_bits:.1f}x smaller)"
            print(f"seed {seed} {name}: {100 * acc[name][-1]:.2f}", file=sys.stderr, flush=True)
    print(header("python benchmarks/binary_accuracy.py " + " ".join(sys.argv[1:])))
    float_mean = statistics.mean(acc["float"])
    fsize = summarize(DigitsCNN()).size_mb
    print(f"\nfloat model size: {fsize * 1e3:.1f} KB\n")
    print("| method | W/A bits | test acc % (mean ± std) | min–max | Δ vs float (points) | packed size |")
    print("|---|---|---|---|---|---|")
    for name, v in acc.items():
        mean = statistics.mean(v)
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        if name == "float":
            bits = "32/32"
        else:
            r = load_recipe(name)
            bits = f"{r.weights.bits}/{r.activations.bits if r.activations.enabled else 32}"
        print(
            f"| {name} | {bits} | {100 * mean:.2f} ± {100 * std:.2f} | {100 * min(v):.2f}–{100 * max(v):.2f} "
            f"| {100 * (mean - float_mean):+.2f} | {size.get(name, f'{fsize * 1e3:.1f} KB')} |"
        )
    step_times(args.rounds)


if __name__ == "__main__":
    main()
