"""Model surgery: choose layers by type and name, swap them for quantized layers, fold BatchNorm, report.

No graph tracing is involved: layers are found on the module tree, so models that ``torch.fx`` or
``torch.export`` cannot trace (data-dependent control flow, dict inputs) are handled like any other.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.nn.modules import (
    FOLDED_BN_CLASSES,
    QUANTIZED_CLASSES,
    FoldedBatchNorm,
    QuantizedLayer,
    _QuantConvNd,
    name_quantizers,
    quantized_class,
    selection_name,
    swap_class,
)
from lightning_quant.quantizers import QUANTIZERS, QuantizerConfig, build_quantizer
from lightning_quant.quantizers.functional import num_groups
from lightning_quant.quantizers.state import OptionalStateModule

# Convs a following BatchNorm can fold into, float or already quantized.
_FOLDABLE_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    *(QUANTIZED_CLASSES[c] for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
)

# Leaf modules with parameters that need no quantization of their own (normalisation, activations).
_PASSIVE = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.PReLU,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass
class LayerOverride:
    """Settings for the layers whose name matches ``pattern`` (a glob such as ``"classifier.*"``)."""

    pattern: str = "???"
    skip: bool = False  # leave in float
    weight_bits: Optional[int] = None
    activation_bits: Optional[int] = None


@dataclass
class LayerSelection:
    """Which layers are quantized (the ``layers`` recipe section)."""

    types: list[str] = field(default_factory=lambda: ["Conv1d", "Conv2d", "Conv3d", "Linear"])
    include: list[str] = field(default_factory=lambda: ["*"])  # name globs
    exclude: list[str] = field(default_factory=list)  # name globs
    first_layer: str = "8bit"  # float, 8bit or same: the first selected layer (registration order)
    last_layer: str = "8bit"  # float, 8bit or same: the last selected layer
    overrides: list[LayerOverride] = field(default_factory=list)
    fold_bn: bool = False  # fold a BatchNorm declared right after a conv into that conv
    # name globs of modules whose output is fake-quantized too (activation settings): quantized layers, e.g.
    # convs feeding a residual addition, or whole blocks (a residual block's sum), so that exported graphs
    # run them as integer kernels end to end
    quantize_outputs: list[str] = field(default_factory=list)
    # name globs of modules (not layers: those quantize their inputs already) whose input is fake-quantized, e.g.
    # the first residual block, whose input reaches both its first conv and its residual addition
    quantize_inputs: list[str] = field(default_factory=list)


@dataclass
class LayerReport:
    """One row of the surgery summary."""

    name: str
    type: str
    status: str  # quantized, float, folded
    weight_bits: Optional[int] = None
    activation_bits: Optional[int] = None
    method: str = ""
    reason: str = ""


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` did, layer by layer, with warnings for what it could not handle."""

    layers: list[LayerReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "quantized"]

    def table(self) -> str:
        """Plain-text table of every considered layer."""
        head = ("layer", "type", "status", "W bits", "A bits", "method", "note")
        rows = [
            (
                r.name,
                r.type,
                r.status,
                "-" if r.weight_bits is None else str(r.weight_bits),
                "-" if r.activation_bits is None else str(r.activation_bits),
                r.method,
                r.reason,
            )
            for r in self.layers
        ]
        return format_table(head, rows)


def format_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned plain-text table with a header rule."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)])


def clean_name(name: str) -> str:
    """Module name without ``torch.compile``'s ``_orig_mod`` segments, as users write it in globs."""
    return ".".join(p for p in name.split(".") if p != "_orig_mod")


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _edge_config(rule: str, cfg: QuantizerConfig) -> Optional[QuantizerConfig]:
    if rule == "float":
        return None
    if rule == "8bit":
        return replace(cfg, bits=max(cfg.bits, 8))
    return cfg


def _fold_pairs(model: nn.Module) -> dict[nn.Module, nn.modules.batchnorm._BatchNorm]:
    """Conv -> BatchNorm pairs: a BatchNorm registered right after a conv in the same parent, matching width."""
    pairs: dict[nn.Module, nn.modules.batchnorm._BatchNorm] = {}
    for parent in model.modules():
        children = list(parent.children())
        for a, b in zip(children, children[1:]):
            if (
                type(a) in _FOLDABLE_CONVS
                and type(b) in FOLDED_BN_CLASSES
                and b.num_features == a.out_channels
                and b.affine
                and b.track_running_stats
            ):
                pairs[a] = b
    return pairs


def quantize_model(
    model: nn.Module,
    weights: QuantizerConfig,
    activations: QuantizerConfig,
    layers: Optional[LayerSelection] = None,
) -> QuantizationReport:
    """Swap the selected layers of ``model`` for quantized layers, in place, and report what happened.

    Layers that are already quantized are kept as they are (so a second call, or a second ``fit``, is
    harmless). Layers with parameters that cannot be quantized stay in float and are named in
    ``report.warnings``. Example::

        report = quantize_model(net, QuantizerConfig(method="lsq", bits=4), QuantizerConfig(method="lsq", bits=4))
        print(report.table())
    """
    layers = layers or LayerSelection()
    report = QuantizationReport()
    seen: set[int] = set()
    candidates: list[tuple[str, nn.Module]] = []
    for raw_name, module in model.named_modules():
        name = clean_name(raw_name)
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, QuantizedLayer):
            seen.update(id(m) for m in module.modules())
            candidates.append((name, module))  # kept as is, but counted so first/last stay the same layers
            continue
        if isinstance(module, (FoldedBatchNorm, OptionalStateModule)):
            seen.update(id(m) for m in module.modules())  # quantizers and their observers
            continue
        qcls = quantized_class(type(module))
        if qcls is not None and selection_name(qcls) in layers.types:
            candidates.append((name, module))
            continue
        own_params = [n for n, _ in module.named_parameters(recurse=False)]
        if own_params and not isinstance(module, _PASSIVE):
            msg = (
                f"left in float: '{name}' ({type(module).__name__}) holds parameters {own_params} but is not a "
                f"supported layer type ({', '.join(layers.types)}); its computation is not quantized"
            )
            report.warnings.append(msg)
            report.layers.append(LayerReport(name, type(module).__name__, "float", reason="unsupported layer"))

    fold = _fold_pairs(model) if layers.fold_bn else {}
    for index, (name, module) in enumerate(candidates):
        wcfg: Optional[QuantizerConfig] = weights if weights.enabled else None
        acfg: Optional[QuantizerConfig] = activations if activations.enabled else None
        reason = ""
        if isinstance(module, QuantizedLayer):
            report.layers.append(_existing_row(name, module))
            continue
        if not _matches(name, layers.include) or _matches(name, layers.exclude):
            report.layers.append(
                LayerReport(name, type(module).__name__, "float", reason="excluded by layers.include/exclude")
            )
            continue
        edge = "first_layer" if index == 0 else "last_layer" if index == len(candidates) - 1 else ""
        if edge:
            rule = getattr(layers, edge)
            if rule == "float":
                report.layers.append(LayerReport(name, type(module).__name__, "float", reason=f"layers.{edge}=float"))
                continue
            wcfg = _edge_config(rule, wcfg) if wcfg else None
            acfg = _edge_config(rule, acfg) if acfg else None
            reason = f"layers.{edge}={rule}" if rule != "same" else ""
        skipped = False
        for ov in layers.overrides:
            if fnmatch.fnmatchcase(name, ov.pattern):
                skipped = skipped or ov.skip
                if ov.weight_bits is not None and wcfg is not None:
                    wcfg = replace(wcfg, bits=ov.weight_bits)
                if ov.activation_bits is not None and acfg is not None:
                    acfg = replace(acfg, bits=ov.activation_bits)
                reason = f"override {ov.pattern!r}"
        if skipped:
            report.layers.append(LayerReport(name, type(module).__name__, "float", reason=reason))
            continue
        output = acfg is not None and _matches(name, layers.quantize_outputs)
        _convert(module, wcfg, acfg, fold.get(module), output)
        row = _existing_row(name, module)  # type: ignore[arg-type]
        notes = (reason, "BN folded" if module in fold else "", "output quantized" if output else "")
        row.reason = ", ".join(x for x in notes if x)
        report.layers.append(row)
    if activations.enabled:
        _quantize_module_boundaries(model, activations, layers.quantize_inputs, "input", report)
        _quantize_module_boundaries(model, activations, layers.quantize_outputs, "output", report)
    name_quantizers(model)  # errors (non-finite input) name the quantizer: conv1.input_quantizer
    return report


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


def _quantize_module_boundaries(
    model: nn.Module, cfg: QuantizerConfig, patterns: list[str], side: str, report: Any
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
        if not name or id(module) in inside or not _matches(name, patterns):
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


def _existing_row(name: str, module: QuantizedLayer) -> LayerReport:
    wq, aq = module.weight_quantizer, module.input_quantizer
    methods = sorted({q.cfg.method for q in (wq, aq) if q is not None})
    return LayerReport(
        name,
        type(module).float_class.__name__,
        "quantized",
        wq.bits if wq is not None else None,
        aq.bits if aq is not None else None,
        "/".join(methods),
        "already quantized",
    )


def _convert(
    module: nn.Module,
    wcfg: Optional[QuantizerConfig],
    acfg: Optional[QuantizerConfig],
    bn: Optional[nn.modules.batchnorm._BatchNorm] = None,
    output: bool = False,
) -> None:
    qcls = quantized_class(type(module))
    assert qcls is not None
    float_cls = type(module)
    swap_class(module, qcls)  # first, so the weight is seen in the layout its quantizer uses
    try:
        layer: QuantizedLayer = module  # type: ignore[assignment]
        weight = layer.weight_to_quantize()
        wq = None
        if wcfg is not None:
            wcfg = copy.copy(wcfg)
            if wcfg.axis is None:
                wcfg.axis = qcls.weight_axis
            groups = num_groups(weight.shape, wcfg.granularity, wcfg.axis, wcfg.group_size)  # type: ignore[arg-type]
            wq = build_quantizer(wcfg, "weight", groups).to(weight.device)
        aq = None
        if acfg is not None and qcls.has_input:
            channels = getattr(module, "in_channels", getattr(module, "in_features", 1))
            groups = channels if QUANTIZERS[acfg.method].per_input_channel else 1  # e.g. ReActNet's RSign shifts
            aq = build_quantizer(acfg, "activation", groups).to(weight.device)
        oq = build_quantizer(acfg, "activation", 1).to(weight.device) if output and acfg is not None else None
    except Exception:
        swap_class(module, float_cls)
        raise
    module.weight_quantizer = wq
    module.input_quantizer = aq
    if oq is not None:
        module.output_quantizer = oq
    if bn is not None:
        swap_class(bn, FOLDED_BN_CLASSES[type(bn)])
        object.__setattr__(module, "folded_bn", bn)  # a reference, not a child: the state dict keeps its keys


def dequantize_model(model: nn.Module) -> None:
    """Undo :func:`quantize_model` in place: float classes back, quantizers removed, BatchNorm unfolded."""
    for module in list(model.modules()):
        if isinstance(module, QuantizedLayer):
            del module.weight_quantizer
            del module.input_quantizer
            if "output_quantizer" in module._modules:
                del module.output_quantizer
            if isinstance(module, _QuantConvNd) and "folded_bn" in module.__dict__:
                del module.__dict__["folded_bn"]
            swap_class(module, type(module).float_class)
        elif isinstance(module, FoldedBatchNorm):
            swap_class(module, type(module).float_class)
        else:
            for side, hooks in (("input", module._forward_pre_hooks), ("output", module._forward_hooks)):
                if _HOOK_KEYS[side] in module.__dict__:
                    hooks.pop(module.__dict__.pop(_HOOK_KEYS[side]), None)
                    module._modules.pop(f"{side}_quantizer", None)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """``(name, layer)`` for every quantized layer of ``model`` (each shared module once)."""
    out: list[tuple[str, QuantizedLayer]] = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLayer) and id(m) not in seen:
            seen.add(id(m))
            out.append((clean_name(name), m))
    return out


def set_bn_frozen(model: nn.Module, frozen: bool = True) -> int:
    """Freeze (or unfreeze) BatchNorm statistics: folded convs switch to running stats, plain BN to eval.

    Returns the number of BatchNorm layers affected.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, _QuantConvNd) and m.folded_bn is not None:
            m.bn_frozen = frozen
            count += 1
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, FoldedBatchNorm):
            m.train(not frozen)
            count += 1
    return count
