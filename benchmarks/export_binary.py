"""Packed binary models: file size against the float model, CPU latency of the packed model, agreement.

Each model is binarized with a shipped binary recipe (layer selection as the recipe says: first and last layer
float), packed with ``save_packed`` (1 bit per binary weight and a scale per output channel) and loaded back
with ``load_packed``. Sizes are the files on disk (``torch.save`` of the float state dict against the packed
file). Latency: the loaded packed model against the float model, both eager PyTorch (no maintained library
ships a packed-bit CPU kernel, so the packed model unpacks its signs once and runs float convolutions),
interleaved after a warm-up on 2 threads; median ratio with min-max. Agreement: predictions of the loaded
packed model against its fake-quant model. Accuracy of trained binary models is in binary_accuracy.py.

    python benchmarks/export_binary.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from lightning_quant import load_packed, load_recipe, quantize_model
from lightning_quant.deploy import save_packed
from lightning_quant.examples import resnet20

sys.path.insert(0, os.path.dirname(__file__))
from common import header, interleaved_ratios  # noqa: E402
from export_latency import build  # noqa: E402


def models() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """The trained digits CNN (with its test images) and a ResNet-20 with random weights (random images)."""
    digits, _, x, _, _ = build("digits")
    torch.manual_seed(0)
    return {"digits CNN": (digits.eval(), x), "ResNet-20": (resnet20().eval(), torch.randn(256, 3, 32, 32))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print(header("python benchmarks/export_binary.py " + " ".join(sys.argv[1:])))
    print(f"latency ratio packed/float (eager PyTorch), median (min-max) over {args.rounds} rounds\n")
    columns = ("model", "recipe", "float state dict", "packed file", "smaller", "agreement with fake-quant", "batch 1")
    print("| " + " | ".join(columns) + " | batch 64 |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (net, x) in models().items():
            float_path = Path(tmp) / "float.pt"
            torch.save(net.state_dict(), float_path)
            for recipe in ("binaryconnect", "bnn"):
                r = load_recipe(recipe)
                fake = copy.deepcopy(net)
                quantize_model(fake, r.weights, r.activations, r.layers)
                fake.eval()
                path = save_packed(fake, Path(tmp) / f"{recipe}.packed")
                packed = load_packed(path)
                with torch.no_grad():
                    agree = (packed(x).argmax(1) == fake(x).argmax(1)).float().mean().item()
                    cells = []
                    for batch in (1, 64):
                        inp = x[:batch]
                        fns = {"float": lambda i=inp: net(i), "packed": lambda i=inp: packed(i)}
                        med, lo, hi = interleaved_ratios(fns, "float", rounds=args.rounds)["packed"]
                        cells.append(f"{med:.2f} ({lo:.2f}-{hi:.2f})")
                f_kb, p_kb = float_path.stat().st_size / 1024, path.stat().st_size / 1024
                print(
                    f"| {label} | {recipe} | {f_kb:.0f} KB | {p_kb:.0f} KB | {f_kb / p_kb:.1f}x | "
                    f"{100 * agree:.1f} % | {cells[0]} | {cells[1]} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
