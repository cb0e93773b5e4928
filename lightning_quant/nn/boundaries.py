"""Input and output quantizers on modules that are not layers (e.g. a residual block's sum), applied by hooks.

Quantized layers quantize their own input and output; ``layers.quantize_inputs`` / ``layers.quantize_outputs``
name other modules whose boundary should be on an integer grid too, so exported graphs stay integer end to end.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
from torch import nn

from lightning_quant.nn.modules import FoldedBatchNorm, QuantizedLayer, quantized_class
from lightning_quant.nn.report import LayerReport, QuantizationReport, clean_name, matches
from lightning_quant.quantizers import QuantizerConfig, build_quantizer
from lightning_quant.quantizers.state import OptionalStateModule

# ids of the hooks that apply a non-layer module's boundary quantizers: input (pre-hook) and output (hook)
_HOOK_KEYS = {"input": "_lightning_quant_input_hook", "output": "_lightning_quant_output_hook"}


def _boundary_tensor(name: str, side: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"layers.quantize_{side}s matched '{name}', whose {side} is a {type(value).__name__}; only a module "
            f"{'taking' if side == 'input' else 'returning'} one tensor can have its {side} quantized"
        )
    return value


def _input_hook(name: str, module: nn.Module, args: tuple[Any, ...]) -> Any:
    q = module._modules.get("input_quantizer")
    if q is None:
        return None
    if not args:  # called with keyword arguments only: there is no first input to quantize
        raise TypeError(f"layers.quantize_inputs matched '{name}', which was called without a positional input")
    return (q(_boundary_tensor(name, "input", args[0])), *args[1:])


def _output_hook(name: str, module: nn.Module, args: Any, output: Any) -> Any:
    q = module._modules.get("output_quantizer")
    if q is None:
        return output
    return q(_boundary_tensor(name, "output", output))


def quantize_module_boundaries(
    model: nn.Module, cfg: QuantizerConfig, patterns: list[str], side: str, report: QuantizationReport
) -> None:
    """Input or output quantizers, applied by a hook, on matched modules that are not layers (e.g. residual blocks).

    Quantized layers quantize their own input and output; layers left in float and the quantizers themselves are
    skipped. The quantizer is the module's child ``input_quantizer``/``output_quantizer``, so it is checkpointed.
    """
    inside: set[int] = set()
    attr = f"{side}_quantizer"
    for raw_name, module in model.named_modules():
        name = clean_name(raw_name)
        if isinstance(module, (QuantizedLayer, OptionalStateModule)):
            inside.update(id(m) for m in module.modules() if m is not module)
        if not name or id(module) in inside or not matches(name, patterns):
            continue
        if isinstance(module, (QuantizedLayer, OptionalStateModule, FoldedBatchNorm)):
            continue
        if quantized_class(type(module)) is not None:
            continue  # a layer the recipe left in float stays float
        if attr not in module._modules:
            anchor = next(itertools.chain(module.parameters(), module.buffers(), model.parameters()), None)
            q = build_quantizer(cfg, "activation", 1)
            module.add_module(attr, q.to(anchor.device) if anchor is not None else q)
        if _HOOK_KEYS[side] not in module.__dict__:
            if side == "input":
                handle = module.register_forward_pre_hook(functools.partial(_input_hook, name))
            else:
                handle = module.register_forward_hook(functools.partial(_output_hook, name))
            module.__dict__[_HOOK_KEYS[side]] = handle.id  # an id, not the handle: model copies stay independent
        report.layers.append(
            LayerReport(name, type(module).__name__, "quantized", None, cfg.bits, cfg.method, f"{side} quantized")
        )


def remove_boundary_quantizers(module: nn.Module) -> None:
    """Undo :func:`quantize_module_boundaries` on one module: its hooks and quantizers go."""
    for side, hooks in (("input", module._forward_pre_hooks), ("output", module._forward_hooks)):
        if _HOOK_KEYS[side] in module.__dict__:
            hooks.pop(module.__dict__.pop(_HOOK_KEYS[side]), None)
            module._modules.pop(f"{side}_quantizer", None)
