"""The quantizer base class, its common configuration dataclass and the name -> class registry.

A quantizer is an ``nn.Module`` that fake-quantizes one tensor (a layer's weight or its input). Its
range state lives in buffers/parameters so that checkpoints carry it; whether it quantizes and whether it
still learns its range from data are plain flags, which code outside the quantizer classes sets through
:mod:`lightning_quant.quantizers.modes` (``set_modes``, ``quant_state``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch

from lightning_quant.quantizers.finite import check_tensor
from lightning_quant.quantizers.functional import (
    Granularity,
    average_across_ranks,
    broadcast_shape,
    channel_view,
    int_range,
)
from lightning_quant.quantizers.grid import ExportGrid, NoIntegerGrid
from lightning_quant.quantizers.state import OptionalStateModule
from lightning_quant.registry import Registry, check_options

Role = Literal["weight", "activation"]


@dataclass(init=False)
class QuantizerConfig:
    """How one tensor (weights or activations) is quantized; the ``weights``/``activations`` recipe sections.

    The fields here are those every quantizer reads; ``options`` holds the selected method's own settings (its
    options dataclass, defined next to the quantizer). Keywords of those options may be given flat, as in a
    recipe: ``QuantizerConfig(method="pact", bits=4, clip_init=6.0)`` sets ``options=PACTOptions(clip_init=6.0)``.
    """

    enabled: bool = True  # False: leave this tensor in float
    method: str = "observer"  # registry name: observer, lsq, pact, dorefa, dsq, dynamic, binary methods
    bits: int = 8  # code width, 1..8
    signed: Optional[bool] = None  # None: weights signed; activations from the first batch (LSQ: see LSQQuantizer)
    granularity: str = "per_tensor"  # per_tensor, per_channel (weights), per_group (weights), per_token (dynamic)
    axis: Optional[int] = None  # channel axis for per_channel; None: the layer's output-channel axis
    group_size: int = 128  # group length for per_group
    options: Any = None  # the method's options dataclass; None: its defaults

    def __init__(
        self,
        enabled: bool = True,
        method: str = "observer",
        bits: int = 8,
        signed: Optional[bool] = None,
        granularity: str = "per_tensor",
        axis: Optional[int] = None,
        group_size: int = 128,
        options: Any = None,
        **method_options: Any,
    ) -> None:
        self.enabled = enabled
        self.method = method
        self.bits = bits
        self.signed = signed
        self.granularity = granularity
        self.axis = axis
        self.group_size = group_size
        if options is None or method_options:
            options = QUANTIZERS[method].make_options(options, **method_options)
        self.options = options


class Quantizer(OptionalStateModule):
    """Base class for fake quantizers.

    Subclasses implement ``initialize(x)`` (set the range from the first tensor seen) and ``quantize(x)``.
    ``fake_quant_enabled`` switches quantization off (identity); ``observer_enabled`` lets range state
    follow the data. ``qualname`` names it in errors (its path in the model, set by ``quantize_model``); a NaN or
    Inf input raises :class:`~lightning_quant.quantizers.finite.NonFiniteInputError` before any state changes: at
    initialisation, at every observation (observers) and, while training, at every call of a quantizer with
    learned parameters. A quantizer whose state is absent from a loaded state dict keeps its current state
    (it is re-initialised from data or restored by the callback), so float checkpoints load into it.
    """

    roles: ClassVar[tuple[Role, ...]] = ("weight", "activation")
    per_input_channel: ClassVar[bool] = False  # activation state per input channel of the layer (not per tensor)
    granularities: ClassVar[tuple[Granularity, ...]] = ("per_tensor", "per_channel", "per_group")
    initialized: torch.Tensor  # buffers, saved in checkpoints
    signed: torch.Tensor

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.role = role
        self.bits = cfg.bits
        self.granularity: Granularity = cfg.granularity  # type: ignore[assignment]
        self.axis = cfg.axis if cfg.axis is not None else 0
        self.group_size = cfg.group_size
        self.num_groups = num_groups
        self.fake_quant_enabled = True
        self.observer_enabled = True
        self.calibrating = False  # with fake quantization off: still observe (post-training calibration)
        signed = cfg.signed if cfg.signed is not None else (True if role == "weight" else None)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self._auto_sign = signed is None
        self._initialized = False
        self.qualname = f"an unnamed {type(self).__name__} ({role})"  # replaced by the path in the model at surgery
        self._refresh_range()

    def set_qualname(self, name: str) -> None:
        """Name this quantizer (its path in the model, e.g. ``conv1.weight_quantizer``) for error messages."""
        self.qualname = name

    # -- integer range -------------------------------------------------------------------------------
    def _refresh_range(self) -> None:
        self._initialized = bool(self.initialized)
        self.qmin, self.qmax = int_range(self.bits, bool(self.signed))

    def set_signed(self, signed: bool) -> None:
        """Fix the code's sign (used when ``signed`` was left to the data)."""
        self.signed.fill_(signed)
        self._refresh_range()

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            if self.calibrating:  # post-training calibration: gather ranges, pass the float tensor on
                self._see(x, always=True)
            return x
        self._see(x, always=False)
        if self._parameters and self.training:  # learned state: a NaN would reach it through the gradient
            check_tensor(x, self)
        return self.quantize(x)

    def _see(self, x: torch.Tensor, always: bool) -> None:
        """Initialise from the first tensor, then observe while observing is on.

        Observation happens in training, or with ``always`` (calibration) for activations; a weight does not
        change during calibration, so its first observation stands.
        """
        if not self._initialized:
            check_tensor(x, self)  # once, before the sign and the range are set from x
            with torch.no_grad():
                if self._auto_sign:
                    self.set_signed(bool((x < 0).any()))
                self.initialize(x)
            self.initialized.fill_(True)
            self._initialized = True
        elif self.observer_enabled and (self.training or (always and self.role != "weight")):
            self.observe(x)

    def initialize(self, x: torch.Tensor) -> None:
        """Set the range state from the first tensor seen."""

    def observe(self, x: torch.Tensor) -> None:
        """Update range state from a later tensor while observing (learned quantizers do nothing)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- export ------------------------------------------------------------------------------------------
    def export_grid(self) -> ExportGrid:
        """The static integer grid this quantizer applies, for export, or why it has none (each class says)."""
        return NoIntegerGrid(
            f"{type(self).__name__} declares no integer grid (Quantizer.export_grid); export supports observer, "
            "LSQ and PACT quantizers"
        )

    # -- introspection used by diagnostics and summaries ----------------------------------------------
    def scale_values(self) -> torch.Tensor:
        """Current step size(s), one per group, for logging."""
        return torch.zeros(self.num_groups)

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Lowest and highest representable values, broadcastable per group, for clipping statistics."""
        s = self.scale_values()
        return s * self.qmin, s * self.qmax

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` viewed as ``(groups, N)`` for this quantizer's granularity."""
        return channel_view(x, self.granularity, self.axis, self.group_size)

    def broadcast_per_group(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Reshape ``values`` (one per group) to broadcast against ``like`` (per-group uses the rows view)."""
        if self.granularity == "per_group":
            return values.reshape(-1, 1)
        return values.reshape(broadcast_shape(like, self.granularity, self.axis))

    def apply_rows(self, x: torch.Tensor, fn: Any) -> torch.Tensor:
        """Run ``fn`` on ``x`` in the layout where per-group vectors broadcast, and restore the shape."""
        if self.granularity == "per_group":
            return fn(self.rows(x)).reshape(x.shape)
        return fn(x)

    @torch.no_grad()
    def sync(self) -> None:
        """Make range state identical on all DDP ranks (average of float state by default)."""
        own = [*self.parameters(recurse=False), *self.buffers(recurse=False)]
        average_across_ranks([t.data for t in own if t.is_floating_point()])

    def extra_repr(self) -> str:
        return f"{self.role}, bits={self.bits}, signed={bool(self.signed)}, {self.granularity}"

    def _after_load(self) -> None:
        self._refresh_range()


QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer method", "lightning_quant.quantizers")


def register_quantizer(name: str, options: Optional[type] = None) -> Any:
    """Class decorator: make a quantizer selectable by ``name`` in recipes, with its options dataclass."""
    return QUANTIZERS.register(name, options)


def build_quantizer(cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> Quantizer:
    """Instantiate the quantizer named by ``cfg.method`` for a weight or an activation (its options checked)."""
    method = QUANTIZERS[cfg.method]
    if not isinstance(cfg.options, method.options):
        got = type(cfg.options).__name__
        raise ValueError(f"quantizer method {cfg.method!r} takes {method.options.__name__} options, got {got}")
    check_options(cfg.options)
    return method.handler(cfg, role, num_groups)
