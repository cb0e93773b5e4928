"""Why MSE-searched weight ranges with nearest rounding lose to min-max ranges at 2 bits on the digits demo.

For each seed one float model is trained (20 epochs, Adam, as in ptq_accuracy.py). It is then calibrated with
nearest rounding for each combination of weight observer and activation observer (min-max or MSE), at W2A4,
W2A8 and W3A8. Reported: test accuracy, SQNR of the test logits against float, and for the 2-bit layers the
weight error relative to the weight norm and the "gain", the projection of each quantized filter on its float
filter (<1 means the grid shrinks every output channel).

    python benchmarks/ptq_mse_bias.py [--seeds 0 1 2]
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

from lightning_quant import PostTrainingQuantization
from lightning_quant.examples import DigitsDataModule, ImageClassifier
from lightning_quant.nn import quantized_layers

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, quiet_trainer  # noqa: E402

SETTINGS = [("2", "4"), ("2", "8"), ("3", "8")]
OBSERVERS = [("minmax", "minmax"), ("minmax", "mse"), ("mse", "minmax"), ("mse", "mse")]


def weight_bias(model: torch.nn.Module, bits: int) -> tuple[float, float]:
    """Mean over the layers at ``bits`` of (relative weight error, gain ⟨Wq, W⟩ / ⟨W, W⟩ per output channel)."""
    errors, gains = [], []
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            q = layer.weight_quantizer
            if q is None or q.bits != bits:
                continue
            w = layer.weight_to_quantize().flatten(1)
            wq = layer.quantized_weight().flatten(1)
            errors.append(float(((wq - w).norm(dim=1) / w.norm(dim=1)).mean()))
            gains.append(float(((wq * w).sum(1) / (w * w).sum(1)).mean()))
    return statistics.mean(errors), statistics.mean(gains)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    rows: dict[tuple[str, str, str, str], list[tuple[float, float, float, float]]] = {}
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        dm = DigitsDataModule(batch_size=64)
        base = ImageClassifier(optimizer="adam", lr=0.01, epochs=20)
        quiet_trainer([], 20).fit(base, datamodule=dm)
        for w, a in SETTINGS:
            for wo, ao in OBSERVERS:
                overrides = [
                    f"weights.observer={wo}",
                    f"activations.observer={ao}",
                    f"weights.bits={w}",
                    f"activations.bits={a}",
                    "diagnostics.summary=false",
                ]
                cb = PostTrainingQuantization("mse_w4a8", overrides, seed=seed)
                model = copy.deepcopy(base)
                acc = float(quiet_trainer([cb]).test(model, datamodule=dm, verbose=False)[0]["test_acc"])
                err, gain = weight_bias(model, int(w))
                rows.setdefault((w, a, wo, ao), []).append((acc, cb.last_comparison["output_sqnr_db"], err, gain))
                print(f"seed {seed} W{w}A{a} {wo}/{ao}: {100 * acc:.2f}", file=sys.stderr, flush=True)
    print(header("python benchmarks/ptq_mse_bias.py " + " ".join(sys.argv[1:])))
    print(f"\nnearest rounding, BN folded, first/last layer 8 bit; mean over seeds {args.seeds}\n")
    print("| W/A | weight / activation observer | test acc % | logit SQNR dB | weight error / norm | gain |")
    print("|---|---|---|---|---|---|")
    for (w, a, wo, ao), values in rows.items():
        acc, sqnr, err, gain = (statistics.mean(v) for v in zip(*values))
        print(f"| {w}/{a} | {wo} / {ao} | {100 * acc:.2f} | {sqnr:.2f} | {err:.3f} | {gain:.3f} |")


if __name__ == "__main__":
    main()
