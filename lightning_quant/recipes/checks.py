"""Range and combination checks on a typed recipe (what the schema's types cannot say).

The ranges of one method's keys are checked by that method's options (their ``check()``); here they become a
:class:`RecipeError` naming the file and the key's full path.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional

from lightning_quant.nn.modules import TYPE_NAMES
from lightning_quant.ptq import ALGORITHMS, PTQConfig
from lightning_quant.quantizers import QUANTIZERS, ObserverQuantizer, QuantizerConfig
from lightning_quant.recipes.kinds import KINDS, kind_note, validate_kind
from lightning_quant.recipes.schema import Recipe, RecipeError, Where, check, refuse
from lightning_quant.registry import OptionError, Registry, check_options

_EDGE_RULES = ("float", "8bit", "same")
_OPTIMIZERS = ("sgd", "adam", "adamw")
_GRANULARITIES = ["per_tensor", "per_channel", "per_group", "per_token"]
DATA_SOURCES = ("train", "val", "generated", "auto")


def _options(section: Any, key: str, selector: str, registry: Registry[Any], where: Where) -> None:
    """The section's options are its method's, and in range (the options' own ``check()``)."""
    name = getattr(section, selector)
    check(name in registry, where, f"{key}.{selector}", name, f"allowed: {registry.names()}")
    wanted = registry[name].options
    check(isinstance(section.options, wanted), where, f"{key}.{selector}", name, f"its options are {wanted.__name__}")
    try:
        check_options(section.options)
    except OptionError as err:
        raise refuse(where, f"{key}.{err.key}", err.value, err.allowed) from None


def _granularity(cfg: QuantizerConfig, key: str, role: str, where: Where) -> None:
    check(cfg.granularity in _GRANULARITIES, where, f"{key}.granularity", cfg.granularity, f"allowed: {_GRANULARITIES}")
    if role == "activation":
        check(
            cfg.granularity in ("per_tensor", "per_token"),
            where,
            f"{key}.granularity",
            cfg.granularity,
            "activations are quantized per_tensor, or per_token with method: dynamic "
            "(their channel count is not known before data flows)",
        )
    qcls = QUANTIZERS[cfg.method].handler
    check(
        cfg.granularity in qcls.granularities,
        where,
        f"{key}.granularity",
        cfg.granularity,
        f"the {cfg.method} quantizer supports {', '.join(qcls.granularities)}",
    )


def _quantizer(cfg: QuantizerConfig, key: str, role: str, where: Where) -> None:
    check(cfg.method in QUANTIZERS, where, f"{key}.method", cfg.method, f"allowed: {QUANTIZERS.names()}")
    qcls = QUANTIZERS[cfg.method].handler
    check(1 <= cfg.bits <= 8, where, f"{key}.bits", cfg.bits, "allowed: 1 to 8")
    roles = ", ".join(qcls.roles)
    check(role in qcls.roles, where, f"{key}.method", cfg.method, f"{cfg.method} quantizes {roles} only")
    _granularity(cfg, key, role, where)
    check(cfg.axis is None or -5 <= cfg.axis <= 4, where, f"{key}.axis", cfg.axis, "a weight axis, -5 to 4, or null")
    check(cfg.group_size > 0, where, f"{key}.group_size", cfg.group_size, "must be a positive integer")
    _options(cfg, key, "method", QUANTIZERS, where)


def _layers(recipe: Recipe, where: Where) -> None:
    lay = recipe.layers
    for i, t in enumerate(lay.types):
        check(t in TYPE_NAMES, where, f"layers.types[{i}]", t, f"allowed: {sorted(TYPE_NAMES)}")
    for key in ("first_layer", "last_layer"):
        value = getattr(lay, key)
        check(value in _EDGE_RULES, where, f"layers.{key}", value, f"allowed: {list(_EDGE_RULES)}")
    for i, ov in enumerate(lay.overrides):
        pattern, key = ov.pattern.strip(), f"layers.overrides[{i}].pattern"
        check(pattern not in ("", "???"), where, key, ov.pattern, "a module-name glob is required")
        for key in ("weight_bits", "activation_bits"):
            bits = getattr(ov, key)
            check(bits is None or 1 <= bits <= 8, where, f"layers.overrides[{i}].{key}", bits, "allowed: 1 to 8")


def _training(recipe: Recipe, where: Where) -> None:
    for f in fields(recipe.schedule):
        value = getattr(recipe.schedule, f.name)
        check(value is None or value >= 0, where, f"schedule.{f.name}", value, "must be >= 0")
    tr = recipe.training
    check(tr.optimizer in _OPTIMIZERS, where, "training.optimizer", tr.optimizer, f"allowed: {list(_OPTIMIZERS)}")
    check(tr.epochs >= 1, where, "training.epochs", tr.epochs, "must be >= 1")
    check(tr.lr > 0, where, "training.lr", tr.lr, "must be positive")
    check(0 <= tr.momentum < 1, where, "training.momentum", tr.momentum, "allowed: 0 <= momentum < 1")
    check(tr.weight_decay >= 0, where, "training.weight_decay", tr.weight_decay, "must be >= 0")
    check(tr.batch_size >= 1, where, "training.batch_size", tr.batch_size, "must be >= 1")
    every = recipe.diagnostics.every_n_steps
    check(every >= 0, where, "diagnostics.every_n_steps", every, "must be >= 0")


def _inq(recipe: Recipe, where: Where) -> None:
    inq = recipe.inq
    check(
        len(inq.portions) == len(inq.epochs) and len(inq.portions) > 0,
        where,
        "inq.portions",
        inq.portions,
        f"one portion per entry of inq.epochs ({inq.epochs})",
    )
    check(
        all(0 < a < b for a, b in zip(inq.portions, inq.portions[1:]))
        and inq.portions[0] > 0
        and inq.portions[-1] == 1,
        where,
        "inq.portions",
        inq.portions,
        "increasing accumulated fractions in (0, 1], ending at 1.0",
    )
    check(inq.epochs[0] >= 0, where, "inq.epochs", inq.epochs, "epochs count from 0")
    check(all(a < b for a, b in zip(inq.epochs, inq.epochs[1:])), where, "inq.epochs", inq.epochs, "increasing")
    check(inq.seed >= 0, where, "inq.seed", inq.seed, "must be >= 0")
    partitions = ("magnitude", "random", "loss_aware")
    check(inq.partition in partitions, where, "inq.partition", inq.partition, f"allowed: {', '.join(partitions)}")
    levels = ("pow2", "ternary", "binary")
    check(inq.levels in levels, where, "inq.levels", inq.levels, f"allowed: {', '.join(levels)}")
    check(inq.error_weight >= 0, where, "inq.error_weight", inq.error_weight, "must be >= 0")


def _ptq_common(ptq: PTQConfig, where: Where) -> None:
    sources = ", ".join(DATA_SOURCES)
    check(ptq.dataloader in DATA_SOURCES, where, "ptq.dataloader", ptq.dataloader, f"allowed: {sources}")
    check(ptq.generate_length >= 2, where, "ptq.generate_length", ptq.generate_length, "must be >= 2")
    check(
        0 <= ptq.generate_greedy < ptq.generate_length,
        where,
        "ptq.generate_greedy",
        ptq.generate_greedy,
        f"allowed: 0 <= generate_greedy < generate_length ({ptq.generate_length})",
    )
    for key, low in {"num_samples": 1, "batch_size": 1, "seed": 0}.items():
        value = getattr(ptq, key)
        check(value >= low, where, f"ptq.{key}", value, f"must be >= {low}")
    check(ptq.cache_limit_mb > 0, where, "ptq.cache_limit_mb", ptq.cache_limit_mb, "must be positive")


def _ptq_quantizers(recipe: Recipe, where: Where) -> None:
    """Post-training quantization calibrates observer grids (or quantizes activations dynamically); a method
    whose quantizer extends the observer's (AWQ's scaled grid) calibrates the same way."""
    fixed = tuple(name for name in QUANTIZERS.names() if issubclass(QUANTIZERS[name].handler, ObserverQuantizer))
    for key, cfg, allowed in (
        ("weights", recipe.weights, fixed),
        ("activations", recipe.activations, (*fixed, "dynamic")),
    ):
        check(
            cfg.method in allowed,
            where,
            f"{key}.method",
            cfg.method,
            f"post-training quantization calibrates fixed grids or uses dynamic activations: allowed: {list(allowed)}",
        )
    if recipe.ptq.algorithm == "bitsplit":
        w = recipe.weights
        symmetric = w.options.symmetric
        check(
            w.granularity == "per_channel" and symmetric and w.bits >= 2,
            where,
            "weights",
            f"{w.granularity}, symmetric={symmetric}, bits={w.bits}",
            "bitsplit needs per_channel symmetric weights of 2 bits or more",
        )


def _ptq(recipe: Recipe, where: Where) -> None:
    ptq = recipe.ptq
    check(ptq.algorithm in ALGORITHMS, where, "ptq.algorithm", ptq.algorithm, f"allowed: {ALGORITHMS.names()}")
    _ptq_common(ptq, where)
    _options(ptq, "ptq", "algorithm", ALGORITHMS, where)
    if recipe.kind != "ptq":
        try:
            check(ptq.algorithm == "none", where, "ptq.algorithm", ptq.algorithm, "a reconstruction needs kind: ptq")
        except RecipeError as err:
            raise kind_note(recipe, where, err) from None
        return
    _ptq_quantizers(recipe, where)


def validate_recipe(recipe: Recipe, where: Optional[Where] = None) -> None:
    """Range, combination and kind checks that a schema cannot express; raises :class:`RecipeError`.

    ``where`` maps a key path to the file (or override) that set it; by default every key names ``recipe.source``.
    """
    src = recipe.source or "<recipe>"
    where = where or (lambda _: src)
    check(recipe.kind in KINDS, where, "kind", recipe.kind, f"allowed: {list(KINDS)}")
    _quantizer(recipe.weights, "weights", "weight", where)
    _quantizer(recipe.activations, "activations", "activation", where)
    _layers(recipe, where)
    _training(recipe, where)
    _ptq(recipe, where)
    _inq(recipe, where)
    validate_kind(recipe, where)
