"""The recipe schema: typed dataclasses for every section, and :class:`RecipeError`.

The sections that belong to other layers (``weights``/``activations``: :class:`QuantizerConfig`, ``layers``:
:class:`LayerSelection`, ``ptq``: :class:`PTQConfig`) are defined next to the code that uses them; the keys of
one method (``clip_init`` of PACT, ``damp`` of GPTQ) are in that method's options dataclass, next to its code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from lightning_quant.nn.surgery import LayerSelection
from lightning_quant.ptq import PTQConfig
from lightning_quant.quantizers import QuantizerConfig

# Where a key's value came from, for error messages: key path -> "file.yaml" or "file.yaml: override '...'".
Where = Callable[[str], str]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the source, the key, the value and what is allowed."""


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters, so that a huge value does not flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refuse(where: Where, key: str, value: Any, allowed: str) -> RecipeError:
    """The error for ``key=value``: names the file the value came from, the key's full path and what is allowed."""
    return RecipeError(f"{where(key)}: {key}={short_repr(value)} is not allowed; {allowed}")


def check(ok: bool, where: Where, key: str, value: Any, allowed: str) -> None:
    """Raise :func:`refuse`'s error unless ``ok``."""
    if not ok:
        raise refuse(where, key, value, allowed)


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


def flat_fields(value: Any) -> dict[str, Any]:
    """A dataclass instance's fields by name; a method's ``options`` (a dataclass) are spliced in flat, as in YAML."""
    out = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    options = out.get("options")
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        del out["options"]
        out.update({f.name: getattr(options, f.name) for f in dataclasses.fields(options)})
    return out


def as_plain(value: Any) -> Any:
    """Dataclasses (sections flat, as in YAML) and lists as plain dicts and lists, for writing out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: as_plain(v) for k, v in flat_fields(value).items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value


# The keys of a weights/activations section before each method owned its keys (issue 15), in that order, with
# the defaults they had. The fingerprint hashes this layout, so checkpoints written before the split still resume.
_LEGACY_QUANTIZER_KEYS: dict[str, Any] = {
    "enabled": True,
    "method": "observer",
    "bits": 8,
    "signed": None,
    "symmetric": True,
    "granularity": "per_tensor",
    "axis": None,
    "group_size": 128,
    "observer": "minmax",
    "momentum": 0.01,
    "percentile": 99.99,
    "learn_offset": False,
    "clip_init": None,
    "clip_decay": 1e-4,
}


def _legacy_layout(section: QuantizerConfig, observer: str) -> dict[str, Any]:
    """``section`` as the flat mapping it was before the split (``observer``: that section's old default)."""
    flat = as_plain(section)
    old = {**_LEGACY_QUANTIZER_KEYS, "observer": observer}
    out = {key: flat.pop(key, default) for key, default in old.items()}
    out.update(flat)  # option keys of methods added since
    return out


def default_weights() -> QuantizerConfig:
    """The ``weights`` section a recipe starts from."""
    return QuantizerConfig(method="observer", bits=8)


def default_activations() -> QuantizerConfig:
    """The ``activations`` section a recipe starts from."""
    return QuantizerConfig(method="observer", bits=8, observer="ema")


@dataclass
class Recipe:
    """A validated recipe. Build it with :func:`load_recipe`."""

    name: str = ""
    description: str = "???"
    kind: str = "qat"
    base: Optional[str] = None
    weights: QuantizerConfig = field(default_factory=default_weights)
    activations: QuantizerConfig = field(default_factory=default_activations)
    layers: LayerSelection = field(default_factory=LayerSelection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    ptq: PTQConfig = field(default_factory=PTQConfig)  # post-training settings (kind: ptq)
    inq: INQConfig = field(default_factory=INQConfig)  # incremental schedule (kind: inq)
    source: str = ""  # where it was loaded from (filled in by the loader)

    def to_yaml(self) -> str:
        """The resolved recipe as flat YAML (each section's method options beside its common keys), without source.

        ``load_recipe`` of this text gives this recipe back."""
        data = as_plain(self)
        data.pop("source", None)
        return OmegaConf.to_yaml(data)

    def fingerprint(self) -> str:
        """Hash of what shapes the quantized model (weights, activations, layers); schedules may change."""
        shaping = {
            "weights": _legacy_layout(self.weights, "minmax"),
            "activations": _legacy_layout(self.activations, "ema"),
            "layers": as_plain(self.layers),
        }
        text = OmegaConf.to_yaml(shaping)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
