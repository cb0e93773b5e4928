"""Accuracy of every QAT recipe on the digits demo, mean and spread over 3 seeds.

For each seed one float model is trained (20 epochs, Adam) and every recipe fine-tunes a copy of that same
model with its own training settings. Test data is only used for the final evaluation.

    python benchmarks/qat_accuracy.py [--seeds 0 1 2] [--recipes lsq_w8a8 ...]
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

from lightning_quant import QuantizationAwareTraining, load_recipe
from lightning_quant.examples import DigitsDataModule, ImageClassifier

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, quiet_trainer  # noqa: E402

RECIPES = ["lsq_w8a8", "minmax_w8a8", "lsq_w4a4", "pact_w4a4", "dorefa_w4a4", "dsq_w4a4", "lsq_w3a3", "lsq_w2a2"]


def test_acc(trainer: pl.Trainer, model: pl.LightningModule, dm: DigitsDataModule) -> float:
    return float(trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    results: dict[str, list[float]] = {"float": []}
    times: dict[str, list[float]] = {}
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        dm = DigitsDataModule(batch_size=64)
        base = ImageClassifier(optimizer="adam", lr=0.01, epochs=20)
        quiet_trainer([], 20).fit(base, datamodule=dm)
        results["float"].append(test_acc(quiet_trainer([], 1), base, dm))
        for name in args.recipes:
            recipe = load_recipe(name, ["diagnostics.summary=false", "diagnostics.every_n_steps=0"])
            tr = recipe.training
            model = copy.deepcopy(base)
            model.hparams.update(
                optimizer=tr.optimizer, lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay, epochs=tr.epochs
            )
            pl.seed_everything(seed, verbose=False)
            trainer = quiet_trainer([QuantizationAwareTraining(recipe)], tr.epochs)
            start = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            times.setdefault(name, []).append(time.perf_counter() - start)
            results.setdefault(name, []).append(test_acc(trainer, model, dm))
            print(f"seed {seed} {name}: {100 * results[name][-1]:.2f}", file=sys.stderr, flush=True)
    print(header("python benchmarks/qat_accuracy.py --seeds " + " ".join(map(str, args.seeds))))
    float_mean = statistics.mean(results["float"])
    print(
        "\n| recipe | W/A bits | test acc % (mean ± std) | min–max | Δ vs float (points) | fine-tune epochs"
        " | fit time s (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, accs in results.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        if name == "float":
            bits, epochs, t = "32/32", "20 (Adam)", "-"
        else:
            r = load_recipe(name)
            bits, epochs, t = (
                f"{r.weights.bits}/{r.activations.bits}",
                str(r.training.epochs),
                f"{statistics.median(times[name]):.1f}",
            )
        print(
            f"| {name} | {bits} | {100 * mean:.2f} ± {100 * std:.2f} | {100 * min(accs):.2f}–{100 * max(accs):.2f} "
            f"| {100 * (mean - float_mean):+.2f} | {epochs} | {t} |"
        )


if __name__ == "__main__":
    main()
