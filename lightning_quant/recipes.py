"""Recipes: YAML files validated against typed dataclasses (omegaconf structured configs).

A recipe names the quantizers for weights and activations, which layers to quantize, the schedule and,
for the command-line main job, the fine-tuning settings. Recipes can extend another with ``base:``
and be overridden with ``key=value`` strings. Example::

    recipe = load_recipe("lsq_w4a4", overrides=["weights.bits=3"])
    print(recipe.weights.bits)  # 3
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_quant.algorithms import ALGORITHMS, PTQConfig
from lightning_quant.nn.modules import TYPE_NAMES
from lightning_quant.nn.surgery import LayerOverride, LayerSelection
from lightning_quant.quantizers import QUANTIZERS, QuantizerConfig
from lightning_quant.quantizers.observers import observer_names

RecipeLike = Union[str, Path, dict, DictConfig, "Recipe"]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the source, the key, the value and what is allowed."""


@dataclass
class ScheduleConfig:
    """When quantization starts and when its statistics freeze (epochs and steps count from 0)."""

    start_epoch: int = 0  # fake quantization is off before this epoch
    start_step: int = 0  # ... and before this global step
    observer_steps: Optional[int] = None  # observers follow the data this many steps after start; None: always
    freeze_bn_epoch: Optional[int] = None  # BatchNorm statistics frozen from this epoch on


@dataclass
class TrainingConfig:
    """Fine-tuning settings used by the ``lightning-quant fit`` main job (a callback leaves your optimizer alone)."""

    epochs: int = 10
    optimizer: str = "sgd"  # sgd, adam, adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64


@dataclass
class INQConfig:
    """Incremental quantization schedule (the ``inq`` section, kind: inq)."""

    portions: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.875, 1.0])  # accumulated, last is 1
    epochs: list[int] = field(default_factory=lambda: [0, 2, 4, 6])  # epoch at which each portion is applied
    partition: str = "magnitude"  # magnitude (largest |w| first, INQ), random (its ablation), loss_aware (ELQ)
    seed: int = 0  # for the random partition
    levels: str = "pow2"  # pow2 (INQ's power-of-two set), ternary {-a, 0, a} or binary {-a, a} (ELQ)
    error_weight: float = 1.0  # loss_aware: weight of the approximation error next to the loss change


@dataclass
class DiagnosticsConfig:
    """What the callback logs."""

    every_n_steps: int = 50  # per-layer SQNR/scale/clipping every n training steps (0: only at validation)
    plots: bool = True  # per-layer figures for loggers that take images (W&B, TensorBoard)
    summary: bool = True  # print the surgery table and the bit-aware model summary


@dataclass
class Recipe:
    """A validated recipe. Build it with :func:`load_recipe`."""

    name: str = ""
    description: str = "???"
    kind: str = "qat"
    base: Optional[str] = None
    weights: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(method="observer", bits=8))
    activations: QuantizerConfig = field(
        default_factory=lambda: QuantizerConfig(method="observer", bits=8, observer="ema")
    )
    layers: LayerSelection = field(default_factory=LayerSelection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    ptq: PTQConfig = field(default_factory=PTQConfig)  # post-training settings (kind: ptq)
    inq: INQConfig = field(default_factory=INQConfig)  # incremental schedule (kind: inq)
    source: str = ""  # where it was loaded from (filled in by the loader)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (without its source)."""
        data = OmegaConf.to_container(OmegaConf.structured(self))
        data.pop("source", None)  # type: ignore[union-attr]
        return OmegaConf.to_yaml(data)

    def fingerprint(self) -> str:
        """Hash of what shapes the quantized model (weights, activations, layers); schedules may change."""
        cfg = OmegaConf.structured(self)
        text = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, ["weights", "activations", "layers"]))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_KINDS = ("qat", "ptq", "binary", "inq")
_EDGE_RULES = ("float", "8bit", "same")
_OPTIMIZERS = ("sgd", "adam", "adamw")


def recipes_dir() -> Path:
    """Folder of the shipped recipes: inside the installed wheel, or ``recipes/`` of a source checkout."""
    packaged = Path(str(resources.files("lightning_quant"))) / "_recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "recipes"


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def describe_recipes() -> dict[str, str]:
    """Shipped recipe name -> its one-line description."""
    out = {}
    for name in list_recipes():
        data = yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text()) or {}
        out[name] = str(data.get("description", ""))
    return out


def _read(ref: str, relative_to: Optional[Path] = None) -> tuple[dict[str, Any], str]:
    candidates = []
    if relative_to is not None:
        candidates.append(relative_to / ref)
    candidates += [Path(ref), recipes_dir() / f"{ref}.yaml"]
    for path in candidates:
        if path.suffix in (".yaml", ".yml") and path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise RecipeError(f"{path}: not valid YAML: {err}") from err
            if not isinstance(data, dict):
                raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
            return data, str(path)
    raise RecipeError(f"recipe {ref!r} not found: give a path to a .yaml file or one of {list_recipes()}")


def _resolve_bases(data: dict[str, Any], source: str, chain: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """The recipe and its ``base`` ancestors, oldest first."""
    base = data.get("base")
    if base is None:
        return [(data, source)]
    if not isinstance(base, str):
        raise RecipeError(f"{source}: key 'base' must be a recipe name or path, got {base!r}")
    if base in chain:
        raise RecipeError(f"{source}: recipes extend each other in a cycle: {' -> '.join((*chain, base))}")
    folder = Path(source).parent if Path(source).is_file() else None
    parent, parent_source = _read(base, folder)
    return [*_resolve_bases(parent, parent_source, (*chain, base)), (data, source)]


def _strip_source(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("source",)}


def load_recipe(recipe: RecipeLike, overrides: Optional[list[str]] = None) -> Recipe:
    """Load, merge (``base`` chain, then ``overrides``) and validate a recipe.

    ``recipe`` is a shipped name (``"lsq_w4a4"``), a path to a YAML file, a dict/``DictConfig`` or a
    :class:`Recipe`. ``overrides`` are ``"key.path=value"`` strings. Raises :class:`RecipeError`.
    """
    if isinstance(recipe, Recipe):
        layers = [(_strip_source(OmegaConf.to_container(OmegaConf.structured(recipe))), recipe.source or "<Recipe>")]  # type: ignore[arg-type]
    elif isinstance(recipe, (dict, DictConfig)):
        data = OmegaConf.to_container(recipe) if isinstance(recipe, DictConfig) else dict(recipe)
        layers = _resolve_bases(data, "<dict>")  # type: ignore[arg-type]
    else:
        data, source = _read(str(recipe))
        layers = _resolve_bases(data, source)
    source = layers[-1][1]
    merged = OmegaConf.structured(Recipe)
    for data, src in layers:
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as err:
            raise RecipeError(f"{src}: {_omegaconf_message(err)}") from err
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise RecipeError(f"override {item!r} must look like key.path=value")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except OmegaConfBaseException as err:
                raise RecipeError(f"{source}: override {item!r}: {_omegaconf_message(err)}") from err
    if merged.name == "":
        merged.name = Path(source).stem if source.endswith((".yaml", ".yml")) else "custom"
    if OmegaConf.is_missing(merged, "description"):
        raise RecipeError(f"{source}: key 'description' is required (one line saying what the recipe does)")
    result: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    result.source = source
    validate_recipe(result)
    return result


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    msg = str(err).strip().splitlines()
    keep = [line for line in msg if not line.startswith(("    object_type", "    reference_type"))]
    return " ".join(line.strip() for line in keep)


def _check(ok: bool, source: str, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise RecipeError(f"{source}: {key}={value!r} is not allowed; {allowed}")


def _validate_quantizer(cfg: QuantizerConfig, key: str, role: str, source: str) -> None:
    _check(cfg.method in QUANTIZERS, source, f"{key}.method", cfg.method, f"allowed: {sorted(QUANTIZERS)}")
    qcls = QUANTIZERS[cfg.method]
    _check(1 <= cfg.bits <= 8, source, f"{key}.bits", cfg.bits, "allowed: 1 to 8")
    _check(
        role in qcls.roles,
        source,
        f"{key}.method",
        cfg.method,
        f"{cfg.method} quantizes {', '.join(qcls.roles)} only",
    )
    _check(
        cfg.granularity in ("per_tensor", "per_channel", "per_group", "per_token"),
        source,
        f"{key}.granularity",
        cfg.granularity,
        "allowed: per_tensor, per_channel, per_group, per_token (dynamic activations)",
    )
    if role == "activation":
        _check(
            cfg.granularity in ("per_tensor", "per_token"),
            source,
            f"{key}.granularity",
            cfg.granularity,
            "activations are quantized per_tensor, or per_token with method: dynamic "
            "(their channel count is not known before data flows)",
        )
    _check(
        cfg.granularity in qcls.granularities,
        source,
        f"{key}.granularity",
        cfg.granularity,
        f"the {cfg.method} quantizer supports {', '.join(qcls.granularities)}",
    )
    _check(cfg.observer in observer_names(), source, f"{key}.observer", cfg.observer, f"allowed: {observer_names()}")
    _check(cfg.group_size > 0, source, f"{key}.group_size", cfg.group_size, "must be a positive integer")
    _check(0 < cfg.momentum <= 1, source, f"{key}.momentum", cfg.momentum, "allowed: 0 < momentum <= 1")
    _check(50 < cfg.percentile <= 100, source, f"{key}.percentile", cfg.percentile, "allowed: 50 < percentile <= 100")
    _check(cfg.clip_init is None or cfg.clip_init > 0, source, f"{key}.clip_init", cfg.clip_init, "must be positive")
    _check(cfg.clip_decay >= 0, source, f"{key}.clip_decay", cfg.clip_decay, "must be >= 0")
    _check(
        not (cfg.learn_offset and cfg.method != "lsq"),
        source,
        f"{key}.learn_offset",
        cfg.learn_offset,
        "only the lsq method learns an offset (LSQ+)",
    )


def validate_recipe(recipe: Recipe) -> None:
    """Range and combination checks that a schema cannot express; raises :class:`RecipeError`."""
    src = recipe.source or "<recipe>"
    _check(recipe.kind in _KINDS, src, "kind", recipe.kind, f"allowed: {list(_KINDS)}")
    _validate_quantizer(recipe.weights, "weights", "weight", src)
    _validate_quantizer(recipe.activations, "activations", "activation", src)
    lay = recipe.layers
    for i, t in enumerate(lay.types):
        _check(t in TYPE_NAMES, src, f"layers.types[{i}]", t, f"allowed: {sorted(TYPE_NAMES)}")
    for key in ("first_layer", "last_layer"):
        _check(
            getattr(lay, key) in _EDGE_RULES, src, f"layers.{key}", getattr(lay, key), f"allowed: {list(_EDGE_RULES)}"
        )
    for i, ov in enumerate(lay.overrides):
        _check(
            ov.pattern not in ("", "???"),
            src,
            f"layers.overrides[{i}].pattern",
            ov.pattern,
            "a module-name glob is required",
        )
        for key in ("weight_bits", "activation_bits"):
            bits = getattr(ov, key)
            _check(bits is None or 1 <= bits <= 8, src, f"layers.overrides[{i}].{key}", bits, "allowed: 1 to 8")
    sch = recipe.schedule
    for f in fields(sch):
        value = getattr(sch, f.name)
        _check(value is None or value >= 0, src, f"schedule.{f.name}", value, "must be >= 0")
    tr = recipe.training
    _check(tr.optimizer in _OPTIMIZERS, src, "training.optimizer", tr.optimizer, f"allowed: {list(_OPTIMIZERS)}")
    _check(tr.epochs >= 1, src, "training.epochs", tr.epochs, "must be >= 1")
    _check(tr.lr > 0, src, "training.lr", tr.lr, "must be positive")
    _check(tr.batch_size >= 1, src, "training.batch_size", tr.batch_size, "must be >= 1")
    _validate_ptq(recipe, src)
    inq = recipe.inq
    _check(
        len(inq.portions) == len(inq.epochs) and len(inq.portions) > 0,
        src,
        "inq.portions",
        inq.portions,
        f"one portion per entry of inq.epochs ({inq.epochs})",
    )
    _check(
        all(0 < a < b for a, b in zip(inq.portions, inq.portions[1:]))
        and inq.portions[0] > 0
        and inq.portions[-1] == 1,
        src,
        "inq.portions",
        inq.portions,
        "increasing accumulated fractions in (0, 1], ending at 1.0",
    )
    _check(all(0 <= a < b for a, b in zip(inq.epochs, inq.epochs[1:])), src, "inq.epochs", inq.epochs, "increasing")
    _check(
        inq.partition in ("magnitude", "random", "loss_aware"),
        src,
        "inq.partition",
        inq.partition,
        "allowed: magnitude, random, loss_aware",
    )
    _check(inq.levels in ("pow2", "ternary", "binary"), src, "inq.levels", inq.levels, "allowed: pow2, ternary, binary")
    _check(inq.error_weight >= 0, src, "inq.error_weight", inq.error_weight, "must be >= 0")
    if recipe.kind == "inq":
        bits = recipe.weights.bits
        if inq.levels == "pow2":
            _check(2 <= bits <= 8, src, "weights.bits", bits, "power-of-two levels (INQ) need 2 to 8 bits")
        else:
            need = 2 if inq.levels == "ternary" else 1
            _check(bits == need, src, "weights.bits", bits, f"inq.levels={inq.levels} means weights.bits={need}")
    _check(
        recipe.diagnostics.every_n_steps >= 0,
        src,
        "diagnostics.every_n_steps",
        recipe.diagnostics.every_n_steps,
        "must be >= 0",
    )


DATA_SOURCES = ("train", "val", "generated", "auto")


def _validate_ptq(recipe: Recipe, src: str) -> None:
    ptq = recipe.ptq
    _check(ptq.algorithm in ALGORITHMS, src, "ptq.algorithm", ptq.algorithm, f"allowed: {sorted(ALGORITHMS)}")
    _check(ptq.num_samples >= 1, src, "ptq.num_samples", ptq.num_samples, "must be >= 1")
    _check(ptq.dataloader in DATA_SOURCES, src, "ptq.dataloader", ptq.dataloader, f"allowed: {', '.join(DATA_SOURCES)}")
    _check(ptq.generate_length >= 2, src, "ptq.generate_length", ptq.generate_length, "must be >= 2")
    _check(
        0 <= ptq.generate_greedy < ptq.generate_length,
        src,
        "ptq.generate_greedy",
        ptq.generate_greedy,
        f"allowed: 0 <= generate_greedy < generate_length ({ptq.generate_length})",
    )
    _check(ptq.iters >= 0, src, "ptq.iters", ptq.iters, "must be >= 0")
    _check(ptq.act_iters is None or ptq.act_iters >= 0, src, "ptq.act_iters", ptq.act_iters, "must be >= 0")
    _check(ptq.batch_size >= 1, src, "ptq.batch_size", ptq.batch_size, "must be >= 1")
    _check(0 <= ptq.drop_prob < 1, src, "ptq.drop_prob", ptq.drop_prob, "allowed: 0 <= drop_prob < 1")
    _check(0 <= ptq.warmup < 1, src, "ptq.warmup", ptq.warmup, "allowed: 0 <= warmup < 1")
    _check(ptq.sweeps >= 1, src, "ptq.sweeps", ptq.sweeps, "must be >= 1")
    _check(ptq.cache_limit_mb > 0, src, "ptq.cache_limit_mb", ptq.cache_limit_mb, "must be positive")
    for key in ("weight_lr", "act_lr"):
        _check(getattr(ptq, key) > 0, src, f"ptq.{key}", getattr(ptq, key), "must be positive")
    if recipe.kind != "ptq":
        _check(ptq.algorithm == "none", src, "ptq.algorithm", ptq.algorithm, "a reconstruction needs kind: ptq")
        return
    for key, cfg, allowed in (
        ("weights", recipe.weights, ("observer",)),
        ("activations", recipe.activations, ("observer", "dynamic")),
    ):
        _check(
            cfg.method in allowed,
            src,
            f"{key}.method",
            cfg.method,
            f"post-training quantization calibrates fixed grids or uses dynamic activations: allowed: {list(allowed)}",
        )
    if ptq.algorithm == "bitsplit":
        w = recipe.weights
        _check(
            w.granularity == "per_channel" and w.symmetric and w.bits >= 2,
            src,
            "weights",
            f"{w.granularity}, symmetric={w.symmetric}, bits={w.bits}",
            "bitsplit needs per_channel symmetric weights of 2 bits or more",
        )


__all__ = [
    "DiagnosticsConfig",
    "INQConfig",
    "LayerOverride",
    "LayerSelection",
    "Recipe",
    "RecipeError",
    "ScheduleConfig",
    "TrainingConfig",
    "describe_recipes",
    "list_recipes",
    "load_recipe",
    "recipes_dir",
    "validate_recipe",
]
