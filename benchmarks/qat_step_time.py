"""Training-step time of QAT relative to a float step, next to torch's own eager QAT, eager and compiled.

One step = forward, cross-entropy, backward, SGD update. All variants of one model are timed interleaved
(A B C ... A B C ...) in one process after a warm-up, on 2 threads; a round times 10 steps of the small
digits CNN and 1 of ResNet-20. The table gives the median ratio to the float step of the same mode (eager or
compiled) with its min–max.

    python benchmarks/qat_step_time.py [--rounds 15] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable

import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

from lightning_quant import load_recipe, quantize_model
from lightning_quant.examples import DigitsCNN, resnet20
from lightning_quant.quantizers import Quantizer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import header, interleaved_ratios  # noqa: E402


def ours(model: nn.Module, recipe: str) -> nn.Module:
    r = load_recipe(recipe)
    quantize_model(model, r.weights, r.activations, r.layers)
    return model


def frozen_observers(model: nn.Module) -> nn.Module:
    """Observers stop following the data after initialisation (what ``schedule.observer_steps`` does)."""
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.observer_enabled = False
    return model


def torch_ao(model: nn.Module) -> nn.Module:
    model.train()
    model.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(model, inplace=True)
    return model


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compile_: bool, steps: int = 1) -> Callable[[], None]:
    """``steps`` training steps per call (a round of the interleaved timing)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(x)  # initialise quantizer ranges before compiling
    fwd = torch.compile(model) if compile_ else model

    def step() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(fwd(x), y).backward()
            opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--models", default="digits,resnet20", help="comma list: digits, resnet20")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cases = {  # (model, input, steps per round): a digits step takes ~6 ms, so a round times 10 of them
        "digits CNN (batch 64, 1x8x8)": (DigitsCNN(), torch.randn(64, 1, 8, 8), 10),
        "ResNet-20 (batch 128, 3x32x32)": (resnet20(), torch.randn(128, 3, 32, 32), 1),
    }
    wanted = {"digits": "digits CNN (batch 64, 1x8x8)", "resnet20": "ResNet-20 (batch 128, 3x32x32)"}
    cases = {wanted[k]: cases[wanted[k]] for k in args.models.split(",")}
    modes = [False] if args.no_compile else [False, True]
    print(header("python benchmarks/qat_step_time.py " + " ".join(sys.argv[1:])))
    print("\n| model | mode | variant | step time / float step (median) | min–max |")
    print("|---|---|---|---|---|")
    for label, (net, x, steps_per_round) in cases.items():
        y = torch.randint(0, 10, (x.shape[0],))
        for compile_ in modes:
            variants = {
                "float": copy.deepcopy(net),
                "lightning-quant minmax_w8a8": ours(copy.deepcopy(net), "minmax_w8a8"),
                "lightning-quant minmax_w8a8, observers frozen": frozen_observers(
                    ours(copy.deepcopy(net), "minmax_w8a8")
                ),
                "lightning-quant lsq_w8a8": ours(copy.deepcopy(net), "lsq_w8a8"),
                "lightning-quant lsq_w4a4": ours(copy.deepcopy(net), "lsq_w4a4"),
                "torch.ao prepare_qat (x86 default)": torch_ao(copy.deepcopy(net)),
            }
            steps = {k: make_step(m, x, y, compile_, steps_per_round) for k, m in variants.items()}
            ratios = interleaved_ratios(steps, "float", rounds=args.rounds)
            mode = "compiled" if compile_ else "eager"
            for name, (med, lo, hi) in ratios.items():
                if name != "float":
                    print(f"| {label} | {mode} | {name} | {med:.2f}x | {lo:.2f}–{hi:.2f} |", flush=True)


if __name__ == "__main__":
    main()
