"""Kind checks: every section and key must be one that the callback running the recipe's ``kind`` uses.

What a callback would silently ignore (an ``inq:`` section in a QAT recipe, ``weights.method`` in an INQ
recipe, 4 bits for a sign binarizer) is refused, naming the key and the kind.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from lightning_quant.ptq import PTQConfig
from lightning_quant.quantizers import QUANTIZERS, QuantizerConfig
from lightning_quant.quantizers.binary import BinaryQuantizer
from lightning_quant.recipes.schema import (
    INQConfig,
    Recipe,
    RecipeError,
    ScheduleConfig,
    Where,
    check,
    default_weights,
    flat_fields,
    refuse,
)

KINDS = ("qat", "ptq", "binary", "inq")
RUNNER = {
    "qat": "QuantizationAwareTraining",
    "ptq": "PostTrainingQuantization",
    "binary": "Binarization",
    "inq": "IncrementalQuantization",
}


def is_binary(method: str) -> bool:
    """True for the binary and ternary quantizers (those the Binarization callback runs)."""
    return issubclass(QUANTIZERS[method].handler, BinaryQuantizer)


def fixed_bits(method: str) -> Optional[int]:
    """The code width a binary quantizer always uses (sign: 1, ternary: 2); None where ``bits`` counts (sketch)."""
    if not is_binary(method):
        return None
    attr = inspect.getattr_static(QUANTIZERS[method].handler, "bits_per_weight")
    return None if isinstance(attr, property) else int(attr)


def _first_change(section: Any, default: Any, path: str) -> Optional[tuple[str, Any]]:
    """The first key (as in YAML: method options flat) whose value differs from ``default``'s."""
    old = flat_fields(default)
    for key, value in flat_fields(section).items():
        if key not in old or value != old[key]:
            return f"{path}.{key}", value
    return None


def _unused(section: Any, default: Any, path: str, kind: str, where: Where, why: str = "") -> None:
    change = _first_change(section, default, path)
    if change is not None:
        key, value = change
        allowed = f"kind: {kind} does not use the {path} section ({RUNNER[kind]} ignores it){why}"
        raise refuse(where, key, value, allowed)


def _enabled(recipe: Recipe) -> list[tuple[str, QuantizerConfig]]:
    return [(k, c) for k, c in (("weights", recipe.weights), ("activations", recipe.activations)) if c.enabled]


def _any_enabled(recipe: Recipe, where: Where) -> None:
    check(
        recipe.weights.enabled or recipe.activations.enabled,
        where,
        "weights.enabled",
        False,
        f"kind: {recipe.kind} with weights and activations both disabled quantizes nothing; enable one",
    )


def _pact_bits(recipe: Recipe, where: Where) -> None:
    act = recipe.activations
    if not (act.enabled and act.method == "pact"):
        return
    need = "PACT activations need 2 bits or more (1 bit leaves a signed grid without a positive level)"
    check(act.bits >= 2, where, "activations.bits", act.bits, need)
    for i, ov in enumerate(recipe.layers.overrides):
        bits = ov.activation_bits
        check(bits is None or bits >= 2, where, f"layers.overrides[{i}].activation_bits", bits, need)


def _qat(recipe: Recipe, where: Where) -> None:
    _any_enabled(recipe, where)
    for key, cfg in _enabled(recipe):
        check(
            not is_binary(cfg.method),
            where,
            f"{key}.method",
            cfg.method,
            "binary and ternary methods need kind: binary (Binarization clips the latent weights and removes ReLUs)",
        )
    _unused(recipe.inq, INQConfig(), "inq", "qat", where)
    if not all(c.method == "observer" for _, c in (("w", recipe.weights), ("a", recipe.activations))):
        why = "; PostTrainingQuantization, which reads it, runs kind: qat recipes only with observer methods"
        _unused(recipe.ptq, PTQConfig(), "ptq", "qat", where, why)


def _ptq(recipe: Recipe, where: Where) -> None:
    _any_enabled(recipe, where)
    _unused(recipe.schedule, ScheduleConfig(), "schedule", "ptq", where, "; calibration runs once")
    _unused(recipe.inq, INQConfig(), "inq", "ptq", where)


def _binary(recipe: Recipe, where: Where) -> None:
    binary = [m for m in QUANTIZERS.names() if is_binary(m)]
    w = recipe.weights
    check(w.enabled, where, "weights.enabled", w.enabled, "kind: binary quantizes weights with a binary method")
    check(is_binary(w.method), where, "weights.method", w.method, f"kind: binary needs a binary method: {binary}")
    act = recipe.activations
    if act.enabled:
        acts = [m for m in binary if "activation" in QUANTIZERS[m].handler.roles]
        check(
            is_binary(act.method),
            where,
            "activations.method",
            act.method,
            f"kind: binary takes binary activations ({acts}) or activations.enabled: false; Binarization removes "
            "ReLUs whenever activations are quantized",
        )
    fixed = []
    for key, cfg in _enabled(recipe):
        bits = fixed_bits(cfg.method)
        if bits is not None:
            fixed.append(key)
            levels = "binary (1 bit)" if bits == 1 else f"ternary ({bits} bits)"
            allowed = f"kind: binary, {cfg.method} is {levels}: bits={bits}"
            check(cfg.bits == bits, where, f"{key}.bits", cfg.bits, allowed)
    if fixed:
        for edge in ("first_layer", "last_layer"):
            rule = getattr(recipe.layers, edge)
            check(
                rule != "8bit",
                where,
                f"layers.{edge}",
                rule,
                f"kind: binary, {'/'.join(fixed)} use a fixed number of bits, so 8bit would only change the report; "
                "use float or same",
            )
        for i, ov in enumerate(recipe.layers.overrides):
            for key, bits_key in (("weights", "weight_bits"), ("activations", "activation_bits")):
                value = getattr(ov, bits_key)
                check(
                    value is None or key not in fixed,
                    where,
                    f"layers.overrides[{i}].{bits_key}",
                    value,
                    f"kind: binary, {key}.method={getattr(recipe, key).method!r} has a fixed number of bits",
                )
    _unused(recipe.ptq, PTQConfig(), "ptq", "binary", where)
    _unused(recipe.inq, INQConfig(), "inq", "binary", where)


def _inq(recipe: Recipe, where: Where) -> None:
    why = "IncrementalQuantization"
    check(
        not recipe.activations.enabled,
        where,
        "activations.enabled",
        True,
        f"kind: inq quantizes weights only ({why} leaves activations float); set activations.enabled: false",
    )
    w, default = recipe.weights, flat_fields(default_weights())
    for key, value in flat_fields(w).items():
        if key != "bits" and (key not in default or value != default[key]):
            allowed = f"kind: inq uses only weights.bits ({why} ignores the other keys)"
            raise refuse(where, f"weights.{key}", value, allowed)
    lay = recipe.layers
    for edge in ("first_layer", "last_layer"):
        rule = getattr(lay, edge)
        check(rule != "8bit", where, f"layers.{edge}", rule, "kind: inq quantizes at weights.bits: use same or float")
    _inq_overrides(recipe, where)
    unused = {"fold_bn": False, "quantize_outputs": [], "quantize_inputs": []}
    for key, empty in unused.items():
        value = getattr(lay, key)
        check(value == empty, where, f"layers.{key}", value, f"kind: inq does not use it ({why} ignores it)")
    _unused(recipe.schedule, ScheduleConfig(), "schedule", "inq", where, "; inq.epochs is its schedule")
    _unused(recipe.ptq, PTQConfig(), "ptq", "inq", where)
    bits, levels = w.bits, recipe.inq.levels
    if levels == "pow2":
        check(2 <= bits <= 8, where, "weights.bits", bits, "power-of-two levels (INQ) need 2 to 8 bits")
    else:
        need = 2 if levels == "ternary" else 1
        check(bits == need, where, "weights.bits", bits, f"inq.levels={levels} means weights.bits={need}")


def _inq_overrides(recipe: Recipe, where: Where) -> None:
    """INQ honours an override's ``skip`` and, on power-of-two levels, its ``weight_bits``; nothing else."""
    levels = recipe.inq.levels
    for i, ov in enumerate(recipe.layers.overrides):
        key, value = f"layers.overrides[{i}]", ov.activation_bits
        check(value is None, where, f"{key}.activation_bits", value, "kind: inq leaves activations float")
        ok = ov.weight_bits is None or (levels == "pow2" and 2 <= ov.weight_bits <= 8)
        allowed = (
            "power-of-two levels (INQ) need 2 to 8 bits"
            if levels == "pow2"
            else f"inq.levels={levels} has a fixed number of bits (weights.bits={recipe.weights.bits}); use skip"
        )
        check(ok, where, f"{key}.weight_bits", ov.weight_bits, allowed)


def kind_note(recipe: Recipe, where: Where, err: RecipeError) -> RecipeError:
    """``err``, saying where ``kind`` was set when that is another file or override than the refused key's."""
    origin = where("kind")
    if str(err).startswith(f"{origin}:"):
        return err
    return RecipeError(f"{err} (kind: {recipe.kind} is set in {origin})")


def validate_kind(recipe: Recipe, where: Where) -> None:
    """Refuse sections and keys that the recipe's kind does not use; see the module docstring."""
    _pact_bits(recipe, where)
    try:
        {"qat": _qat, "ptq": _ptq, "binary": _binary, "inq": _inq}[recipe.kind](recipe, where)
    except RecipeError as err:
        raise kind_note(recipe, where, err) from None
