"""Accuracy of every QAT recipe on the digits demo, mean and spread over 3 seeds.

For each seed one float model is trained (20 epochs, Adam) and every recipe fine-tunes a copy of that same
model with its own training settings. Test data is only used for the final evaluation. Besides accuracy, the
output SQNR of the quantized model's logits against the float model's is reported (dB, on the test set).

    python benchmarks/qat_accuracy.py [--seeds 0 1 2] [--recipes lsq_w8a8 ...]

A recipe may carry overrides after a colon, so that variants run side by side on the same float models, and the
network's ReLUs can be swapped for GELU or SiLU (e.g. LSQ's activation grid; PACT's initial clip)::

    python benchmarks/qat_accuracy.py --act gelu --recipes lsq_w2a2 lsq_w2a2:activations.signed=true
    python benchmarks/qat_accuracy.py --recipes pact_w4a4 pact_w4a4:activations.clip_init=10
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
from torch import nn

from lightning_quant import QuantizationAwareTraining, load_recipe
from lightning_quant.callbacks.diagnostics import sqnr_db
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, quiet_trainer  # noqa: E402

RECIPES = ["lsq_w8a8", "minmax_w8a8", "lsq_w4a4", "pact_w4a4", "dorefa_w4a4", "dsq_w4a4", "lsq_w3a3", "lsq_w2a2"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def test_acc(trainer: pl.Trainer, model: pl.LightningModule, dm: DigitsDataModule) -> float:
    return float(trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"])


def test_logits(model: pl.LightningModule, dm: DigitsDataModule) -> torch.Tensor:
    """Logits on the whole test set (eval mode, quantizers as the last evaluation left them)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in dm.test_dataloader()])
    model.train(was_training)  # the float model is copied for fine-tuning afterwards: leave its mode alone
    return logits


def digits_net(act: str) -> DigitsCNN:
    """The digits CNN with its ReLUs replaced by ``act``."""
    net = DigitsCNN()
    for i, m in enumerate(net.features):
        if isinstance(m, nn.ReLU):
            net.features[i] = ACTIVATIONS[act]()
    return net


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """``name`` or ``name:key=value,key=value`` -> (recipe name, overrides)."""
    name, _, rest = spec.partition(":")
    return name, [o for o in rest.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="names, each optionally name:key=v,key=v")
    parser.add_argument("--act", choices=sorted(ACTIVATIONS), default="relu", help="the network's activation")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (default: each recipe's)")
    parser.add_argument("--float-epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    results: dict[str, list[float]] = {"float": []}
    sqnrs: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        dm = DigitsDataModule(batch_size=64)
        base = ImageClassifier(digits_net(args.act), optimizer="adam", lr=0.01, epochs=args.float_epochs)
        quiet_trainer([], args.float_epochs).fit(base, datamodule=dm)
        results["float"].append(test_acc(quiet_trainer([], 1), base, dm))
        reference = test_logits(base, dm)
        for spec in args.recipes:
            name, overrides = parse_spec(spec)
            recipe = load_recipe(name, ["diagnostics.summary=false", "diagnostics.every_n_steps=0", *overrides])
            tr = recipe.training
            epochs = tr.epochs if args.epochs is None else args.epochs
            model = copy.deepcopy(base)
            model.hparams.update(
                optimizer=tr.optimizer, lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay, epochs=epochs
            )
            pl.seed_everything(seed, verbose=False)
            trainer = quiet_trainer([QuantizationAwareTraining(recipe)], epochs)
            start = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            times.setdefault(spec, []).append(time.perf_counter() - start)
            results.setdefault(spec, []).append(test_acc(trainer, model, dm))
            sqnrs.setdefault(spec, []).append(sqnr_db(reference, test_logits(model, dm)))
            print(f"seed {seed} {spec}: {100 * results[spec][-1]:.2f} ({sqnrs[spec][-1]:.2f} dB)", file=sys.stderr)
    command = f"python benchmarks/qat_accuracy.py --seeds {' '.join(map(str, args.seeds))} --act {args.act}"
    command += f" --float-epochs {args.float_epochs}" + (f" --epochs {args.epochs}" if args.epochs else "")
    print(header(command + " --recipes " + " ".join(args.recipes)))
    float_mean = statistics.mean(results["float"])
    print(
        "\n| recipe | W/A bits | test acc % (mean ± std) | min–max | Δ vs float (points) | output SQNR dB (mean ± std)"
        " | fine-tune epochs | fit time s (median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for spec, accs in results.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        if spec == "float":
            bits, epochs, t, sq = f"32/32 ({args.act})", f"{args.float_epochs} (Adam)", "-", "-"
        else:
            name, overrides = parse_spec(spec)
            r = load_recipe(name, overrides)
            s = sqnrs[spec]
            bits = f"{r.weights.bits}/{r.activations.bits}"
            epochs = str(r.training.epochs if args.epochs is None else args.epochs)
            t = f"{statistics.median(times[spec]):.1f}"
            sq = f"{statistics.mean(s):.2f} ± {statistics.stdev(s) if len(s) > 1 else 0.0:.2f}"
        print(
            f"| {spec} | {bits} | {100 * mean:.2f} ± {100 * std:.2f} | {100 * min(accs):.2f}–{100 * max(accs):.2f} "
            f"| {100 * (mean - float_mean):+.2f} | {sq} | {epochs} | {t} |"
        )


if __name__ == "__main__":
    main()
