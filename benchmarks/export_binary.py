"""Packed binary and ternary models: file size against the float model, exactness, optionally CPU latency.

Each model is quantized with every shipped binary-kind recipe (layer selection as the recipe says: first and
last layer float; ReActNet layers get their RPReLU as the Binarization callback attaches it), saved with
``save_packed`` (a torch.export program: sign bits 8 per byte, one plane per sketch basis, ternary codes 4 per
byte, scales per output channel) and loaded back with ``load_packed`` (no pickle). Sizes are the files on disk
(``torch.save`` of the float state dict against the packed file). Agreement: predictions of the loaded packed
model against its fake-quant model, and the largest absolute difference of their outputs. With ``--rounds N``
(N > 0) it also times the loaded packed model against the float model, both eager PyTorch (no maintained library
ships a packed-bit CPU kernel, so the packed model unpacks its codes on every call), interleaved after a warm-up
on 2 threads: median ratio with min-max. Accuracy of trained binary models is in binary_accuracy.py.

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

from lightning_quant import list_recipes, load_packed, load_recipe, quantize_model
from lightning_quant.examples import resnet20
from lightning_quant.export import save_packed
from lightning_quant.nn import quantized_layers
from lightning_quant.quantizers.binary import RPReLU, RSignQuantizer, apply_rprelu

sys.path.insert(0, os.path.dirname(__file__))
from common import header, interleaved_ratios  # noqa: E402
from export_latency import build  # noqa: E402


def models() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """The trained digits CNN (with its test images) and a ResNet-20 with random weights (random images)."""
    digits, _, x, _, _ = build("digits")
    torch.manual_seed(0)
    return {"digits CNN": (digits.eval(), x), "ResNet-20": (resnet20().eval(), torch.randn(256, 3, 32, 32))}


def binary_recipes() -> list[str]:
    return [name for name in list_recipes() if load_recipe(name).kind == "binary"]


def quantized(net: torch.nn.Module, recipe: str) -> torch.nn.Module:
    """A copy of ``net`` quantized with ``recipe``, with RPReLUs where the Binarization callback adds them."""
    r = load_recipe(recipe)
    fake = copy.deepcopy(net)
    quantize_model(fake, r.weights, r.activations, r.layers)
    for _, layer in quantized_layers(fake):
        if isinstance(layer.input_quantizer, RSignQuantizer):
            channels = int(getattr(layer, "out_channels", getattr(layer, "out_features", 1)))
            layer.rprelu = RPReLU(channels)
            with torch.no_grad():  # not the identity-like init: the check must see it applied
                layer.rprelu.gamma.normal_(0, 0.1)
                layer.rprelu.zeta.normal_(0, 0.1)
            layer.register_forward_hook(apply_rprelu)
    return fake.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=0, help="latency rounds (0: sizes and agreement only)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print(header("python benchmarks/export_binary.py " + " ".join(sys.argv[1:])))
    columns = ["model", "recipe", "float state dict", "packed file", "smaller", "agreement with fake-quant"]
    columns += ["max abs diff"] + (["batch 1", "batch 64"] if args.rounds else [])
    if args.rounds:
        print(f"latency ratio packed/float (eager PyTorch), median (min-max) over {args.rounds} rounds\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    with tempfile.TemporaryDirectory() as tmp:
        for label, (net, x) in models().items():
            float_path = Path(tmp) / "float.pt"
            torch.save(net.state_dict(), float_path)
            for recipe in binary_recipes():
                fake = quantized(net, recipe)
                path = save_packed(fake, x[:1], Path(tmp) / f"{recipe}.packed")
                packed = load_packed(path)
                with torch.no_grad():
                    ref, got = fake(x), packed(x)
                    agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
                    cells = []
                    for batch in (1, 64) if args.rounds else ():
                        inp = x[:batch]
                        fns = {"float": lambda i=inp: net(i), "packed": lambda i=inp: packed(i)}
                        med, lo, hi = interleaved_ratios(fns, "float", rounds=args.rounds)["packed"]
                        cells.append(f"{med:.2f} ({lo:.2f}-{hi:.2f})")
                f_kb, p_kb = float_path.stat().st_size / 1024, path.stat().st_size / 1024
                row = [label, recipe, f"{f_kb:.0f} KB", f"{p_kb:.0f} KB", f"{f_kb / p_kb:.1f}x", f"{100 * agree:.1f} %"]
                row += [f"{float((got - ref).abs().max()):.1e}", *cells]
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
