"""Model surgery: choose layers by type and name, swap them for quantized layers, fold BatchNorm, report.

No graph tracing is involved: layers are found on the module tree, so models that ``torch.fx`` or
``torch.export`` cannot trace (data-dependent control flow, dict inputs) are handled like any other.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Optional, cast

from torch import nn

from lightning_quant.nn.boundaries import quantize_module_boundaries, remove_boundary_quantizers
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
from lightning_quant.nn.report import (  # noqa: F401  (format_table and LayerReport are imported from here too)
    LayerReport,
    LayerSelectionError,
    QuantizationReport,
    check_globs,
    clean_name,
    format_table,
    matches,
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

# set on a model by the callbacks (in its __dict__, not its state): (name, source, fingerprint) of the recipe its
# layers were quantized with, so that quantizing it again under another recipe is refused
RECIPE_ATTR = "_lightning_quant_recipe"


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


def selection_globs(layers: LayerSelection) -> dict[str, list[str]]:
    """Every name glob of a layer selection, by its recipe key (each must match some module)."""
    return {
        "layers.include": [p for p in layers.include if p != "*"],
        "layers.exclude": list(layers.exclude),
        **{f"layers.overrides[{i}].pattern": [ov.pattern] for i, ov in enumerate(layers.overrides)},
        "layers.quantize_outputs": list(layers.quantize_outputs),
        "layers.quantize_inputs": list(layers.quantize_inputs),
    }


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
                pairs[a] = cast(nn.modules.batchnorm._BatchNorm, b)
    return pairs


@dataclass
class LayerChoice:
    """What the ``layers`` section decides for one layer of a selected type: the quantizer settings it gets (edge
    rules and overrides applied), or ``kept``, its report row when it stays float or is already quantized."""

    name: str
    module: nn.Module
    weights: Optional[QuantizerConfig]
    activations: Optional[QuantizerConfig]
    reason: str = ""  # why its settings differ from the recipe's: layers.first_layer=8bit, override 'x'
    kept: Optional[LayerReport] = None


def select_layers(
    model: nn.Module,
    weights: QuantizerConfig,
    activations: QuantizerConfig,
    layers: LayerSelection,
    report: QuantizationReport,
) -> list[LayerChoice]:
    """Apply the ``layers`` rules (types, include/exclude, first/last layer, overrides) to ``model``, in order.

    Every callback selects layers here, so a rule means the same under QAT, binarization and INQ. Modules with
    parameters of an unsupported type are added to ``report`` (rows and warnings); a name glob that matches no
    module raises :class:`LayerSelectionError`.
    """
    check_globs(model, selection_globs(layers))
    candidates = _candidate_layers(model, layers, report)
    return [
        _choose(index, len(candidates), name, module, weights, activations, layers)
        for index, (name, module) in enumerate(candidates)
    ]


def _candidate_layers(
    model: nn.Module, layers: LayerSelection, report: QuantizationReport
) -> list[tuple[str, nn.Module]]:
    """The layers of a type ``layers.types`` selects, and those already quantized, in registration order (each
    shared module once). Other modules holding parameters of their own are reported as left in float."""
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
    return candidates


def _choose(
    index: int,
    count: int,
    name: str,
    module: nn.Module,
    weights: QuantizerConfig,
    activations: QuantizerConfig,
    layers: LayerSelection,
) -> LayerChoice:
    """The decision for the ``index``-th of ``count`` candidate layers."""
    wcfg: Optional[QuantizerConfig] = weights if weights.enabled else None
    acfg: Optional[QuantizerConfig] = activations if activations.enabled else None
    kind = type(module).__name__
    if isinstance(module, QuantizedLayer):
        return LayerChoice(name, module, None, None, kept=_existing_row(name, module))
    if not matches(name, layers.include) or matches(name, layers.exclude):
        return LayerChoice(
            name, module, None, None, kept=LayerReport(name, kind, "float", reason="excluded by layers.include/exclude")
        )
    reason = ""
    edge = "first_layer" if index == 0 else "last_layer" if index == count - 1 else ""
    if edge:
        rule = getattr(layers, edge)
        if rule == "float":
            return LayerChoice(
                name, module, None, None, kept=LayerReport(name, kind, "float", reason=f"layers.{edge}=float")
            )
        wcfg = _edge_config(rule, wcfg) if wcfg else None
        acfg = _edge_config(rule, acfg) if acfg else None
        reason = f"layers.{edge}={rule}" if rule != "same" else ""
    wcfg, acfg, skipped, pattern = _apply_overrides(name, layers.overrides, wcfg, acfg)
    if pattern is not None:
        reason = f"override {pattern!r}"
    if skipped:
        return LayerChoice(name, module, None, None, kept=LayerReport(name, kind, "float", reason=reason))
    return LayerChoice(name, module, wcfg, acfg, reason)


def _apply_overrides(
    name: str,
    overrides: list[LayerOverride],
    wcfg: Optional[QuantizerConfig],
    acfg: Optional[QuantizerConfig],
) -> tuple[Optional[QuantizerConfig], Optional[QuantizerConfig], bool, Optional[str]]:
    """Apply, in order, every ``layers.overrides`` entry whose pattern matches ``name``.

    Returns the weight and activation configs, whether an override skips the layer, and the last matching
    pattern (None when none matches).
    """
    skipped = False
    pattern: Optional[str] = None
    for ov in overrides:
        if fnmatch.fnmatchcase(name, ov.pattern):
            skipped = skipped or ov.skip
            if ov.weight_bits is not None and wcfg is not None:
                wcfg = replace(wcfg, bits=ov.weight_bits)
            if ov.activation_bits is not None and acfg is not None:
                acfg = replace(acfg, bits=ov.activation_bits)
            pattern = ov.pattern
    return wcfg, acfg, skipped, pattern


def quantize_model(
    model: nn.Module,
    weights: QuantizerConfig,
    activations: QuantizerConfig,
    layers: Optional[LayerSelection] = None,
) -> QuantizationReport:
    """Swap the selected layers of ``model`` for quantized layers, in place, and report what happened.

    Layers that are already quantized are kept as they are (so a second call, or a second ``fit``, is
    harmless). Layers with parameters that cannot be quantized stay in float and are named in
    ``report.warnings``. A name glob (``include``, ``exclude``, an override's ``pattern``, ``quantize_outputs``,
    ``quantize_inputs``) that matches no module raises :class:`LayerSelectionError`. Example::

        report = quantize_model(net, QuantizerConfig(method="lsq", bits=4), QuantizerConfig(method="lsq", bits=4))
        print(report.table())
    """
    layers = layers or LayerSelection()
    report = QuantizationReport()
    choices = select_layers(model, weights, activations, layers, report)
    fold = _fold_pairs(model) if layers.fold_bn else {}
    for choice in choices:
        if choice.kept is not None:
            report.layers.append(choice.kept)
            continue
        module, acfg = choice.module, choice.activations
        output = acfg is not None and matches(choice.name, layers.quantize_outputs)
        _convert(module, choice.weights, acfg, fold.get(module), output)
        row = _existing_row(choice.name, cast(QuantizedLayer, module))
        notes = (choice.reason, "BN folded" if module in fold else "", "output quantized" if output else "")
        row.reason = ", ".join(x for x in notes if x)
        report.layers.append(row)
    if activations.enabled:
        quantize_module_boundaries(model, activations, layers.quantize_inputs, "input", report)
        quantize_module_boundaries(model, activations, layers.quantize_outputs, "output", report)
    name_quantizers(model)  # errors (non-finite input) name the quantizer: conv1.input_quantizer
    return report


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
            per_channel = QUANTIZERS[acfg.method].handler.per_input_channel  # e.g. ReActNet's RSign shifts
            groups = channels if per_channel else 1
            aq = build_quantizer(acfg, "activation", groups).to(weight.device)
        oq = build_quantizer(acfg, "activation", 1).to(weight.device) if output and acfg is not None else None
    except Exception:
        swap_class(module, float_cls)
        raise
    layer.weight_quantizer = wq
    layer.input_quantizer = aq
    if oq is not None:
        layer.output_quantizer = oq
    if bn is not None:
        swap_class(bn, FOLDED_BN_CLASSES[type(bn)])
        object.__setattr__(module, "folded_bn", bn)  # a reference, not a child: the state dict keeps its keys


def dequantize_model(model: nn.Module) -> None:
    """Undo :func:`quantize_model` in place: float classes back, quantizers removed, BatchNorm unfolded."""
    model.__dict__.pop(RECIPE_ATTR, None)
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
            remove_boundary_quantizers(module)


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
