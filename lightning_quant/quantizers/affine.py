"""Observer-driven affine fake quantization (the ``observer`` method): fixed scales, fused torch kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.quantizers import _kernels as kernels
from lightning_quant.quantizers.attachment import ReconstructionState
from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.finite import NonFiniteInputError, check_range, message
from lightning_quant.quantizers.functional import (
    fake_quantize,
    qparams_from_range,
    tensor_aminmax,
)
from lightning_quant.quantizers.grid import ExportGrid, grid_for
from lightning_quant.quantizers.observers import EMAObserver, Observer, build_observer, observer_names
from lightning_quant.registry import OptionError


@dataclass
class ObserverOptions:
    """The ``observer`` method's own keys of a ``weights``/``activations`` section: how the range is observed."""

    observer: str = "minmax"  # range estimator: minmax, ema, percentile, mse, kl
    momentum: float = 0.01  # EMA observer momentum
    percentile: float = 99.99  # percentile observer
    symmetric: bool = True  # zero point fixed at 0

    def check(self) -> None:
        if self.observer not in observer_names():
            raise OptionError("observer", self.observer, f"allowed: {observer_names()}")
        if not 0 < self.momentum <= 1:
            raise OptionError("momentum", self.momentum, "allowed: 0 < momentum <= 1")
        if not 50 < self.percentile <= 100:
            raise OptionError("percentile", self.percentile, "allowed: 50 < percentile <= 100")


@register_quantizer("observer", options=ObserverOptions)
class ObserverQuantizer(Quantizer):
    """Uniform affine fake quantization whose range comes from an observer (min-max, EMA, percentile, MSE).

    Weights are re-observed on every training step (their current range); activations accumulate as the
    observer defines. Once ``observer_enabled`` is off the scale is frozen.

    Fixed integer codes: ``set_codes`` fixes a weight's codes (the result of AdaRound, GPTQ or Bit-Split),
    which are then used instead of rounding the float weight. They are the ``codes`` buffer (empty when
    not fixed), saved in checkpoints under ``<quantizer>.codes`` and read by export through the quantized
    weight. While a reconstruction trains a unit it attaches a
    :class:`~lightning_quant.quantizers.attachment.ReconstructionState` (learned rounding or step, QDrop's
    dropping) as ``reconstruction``, and removes it afterwards. Example::

        q = ObserverQuantizer(QuantizerConfig(bits=8, observer="ema"), role="activation")
        y = q(x)
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    codes: torch.Tensor
    observer: Observer

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        opts: ObserverOptions = cfg.options
        self.observer = build_observer(
            opts.observer,
            num_groups,
            bits=cfg.bits,
            signed=True if cfg.signed is None else cfg.signed,
            momentum=opts.momentum,
            percentile=opts.percentile,
            symmetric=opts.symmetric,
        )
        self.symmetric = opts.symmetric
        self.register_buffer("scale", torch.ones(num_groups))
        self.register_buffer("zero_point", torch.zeros(num_groups, dtype=torch.int32))
        self.register_buffer("codes", torch.zeros(0, dtype=torch.int8))  # fixed integer weight codes, if set
        self.reconstruction: Optional[ReconstructionState] = None  # attached while a reconstruction trains it
        self.observer.qualname = self.qualname

    def set_qualname(self, name: str) -> None:
        super().set_qualname(name)
        self.observer.qualname = name  # the observer checks the ranges it computes and names its quantizer

    # -- fixed codes and the reconstruction's attachment --------------------------------------------------------
    @property
    def rounding(self) -> Optional[nn.Module]:
        """The learned rounding (AdaRound) of the attached reconstruction, if any (read-only view)."""
        return None if self.reconstruction is None else self.reconstruction.rounding

    @property
    def drop_prob(self) -> float:
        """QDrop's probability of keeping an element in float while training (0: none attached)."""
        return 0.0 if self.reconstruction is None else self.reconstruction.drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        if self.reconstruction is None:
            if value == 0:
                return
            self.reconstruction = ReconstructionState()
        self.reconstruction.drop_prob = value
        if self.reconstruction.is_empty():
            self.reconstruction = None

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor) -> None:
        """Fix the integer codes of the weight (shape of the weight, values within ``[qmin, qmax]``)."""
        if codes.min() < self.qmin or codes.max() > self.qmax:
            raise ValueError(f"codes outside [{self.qmin}, {self.qmax}]")
        self.codes = codes.to(torch.int8)

    def integer_codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes this quantizer gives ``w`` (the fixed ones if set), zero point included."""
        if self.codes.numel():
            return self.codes.float()
        zp = self.broadcast_per_group(self.zero_point.float(), self.rows(w) if self.granularity == "per_group" else w)
        s = self.broadcast_per_group(self.scale.detach(), self.rows(w) if self.granularity == "per_group" else w)
        v = self.rows(w) if self.granularity == "per_group" else w
        return torch.clamp(torch.round(v.detach() / s) + zp, self.qmin, self.qmax).reshape(w.shape)

    def finalize_calibration(self) -> None:
        """End of calibration: let the observer settle its final range and recompute the qparams."""
        if self.observer.has_range:
            self.observer.finalize()
            self.update_qparams()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        codes = state_dict.get(prefix + "codes")
        if codes is not None and codes.shape != self.codes.shape:
            self.codes = torch.zeros_like(codes)  # size the buffer to the saved codes before loading
        super()._load_from_state_dict(state_dict, prefix, *args)

    def initialize(self, x: torch.Tensor) -> None:
        self.observe(x)

    # -- the eager CPU path ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._initialized and self.fake_quant_enabled and self._observer_ranges_only() and kernels.applies(x):
            if self.granularity == "per_tensor" and self.observer.fused_combine:
                return self._per_tensor_forward(x)
            if self._symmetric_rows():
                return self._per_channel_forward(x)
        return super().forward(x)

    def _observer_ranges_only(self) -> bool:
        """Plain observer fake quantization: no fixed codes, and nothing attached that changes the output."""
        attached = self.reconstruction is not None and self.reconstruction.changes_output(self.training)
        return not attached and not self.codes.numel()

    def _symmetric_rows(self) -> bool:
        """A weight quantized per output channel (axis 0), symmetric and signed, re-observed as plain min/max."""
        return (
            self.role == "weight"
            and self.granularity == "per_channel"
            and self.axis == 0
            and self.symmetric
            and self.qmin < 0
            and self.observer.plain_range
        )

    def _per_tensor_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe and fake-quantize in one fused call where the kernels are built (some thirty ATen calls otherwise,
        each costing more than a small tensor's work), else observe as the tensor path does and fake-quantize
        with the qparams as Python numbers. The same values as the tensor path either way."""
        observing = self.observer_enabled and self.training
        obs = self.observer
        fused = kernels.load()
        if fused is not None:
            mode = -1  # frozen
            if observing:
                mode = 2 if self.role == "weight" else (1 if isinstance(obs, EMAObserver) else 0)
            momentum = obs.momentum if isinstance(obs, EMAObserver) else 0.0
            buffers = (obs.min_val, obs.max_val, obs.count, self.scale, self.zero_point)
            try:
                out = fused.per_tensor_step(
                    x, *buffers, mode, momentum, obs.has_range, self.qmin, self.qmax, self.symmetric
                )
            except ValueError as err:  # the kernel's check of the range, before it wrote anything
                raise NonFiniteInputError(message(self)) from err
            if observing:
                obs.mark_observed()
            return out
        if observing:
            self.observe(x)  # range, running range and qparams as the tensor path computes them
        return kernels.per_tensor_fake_quant(x, self.scale.item(), int(self.zero_point.item()), self.qmin, self.qmax)

    def _per_channel_forward(self, w: torch.Tensor) -> torch.Tensor:
        """Symmetric per-channel weights: one fused call, or the ranges written in place by ``amin``/``amax``."""
        observing = self.observer_enabled and self.training
        obs = self.observer
        fused = kernels.load()
        if fused is not None:
            buffers = (obs.min_val, obs.max_val, self.scale, self.zero_point)
            try:
                return fused.rows_symmetric_step(w, *buffers, observing, self.qmin, self.qmax)
            except ValueError as err:  # the kernel's check of the ranges, before it wrote anything
                raise NonFiniteInputError(message(self)) from err
        if observing:
            rows = w.detach().reshape(w.shape[0], -1)
            lo, hi = torch.amin(rows, dim=1), torch.amax(rows, dim=1)
            check_range(lo, hi, self)
            obs.min_val.copy_(lo)
            obs.max_val.copy_(hi)
            self.update_qparams()
        return kernels.symmetric_fake_quant(w, self.scale, self.zero_point, self.qmin, self.qmax, 0)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if self.role == "weight":  # weights: the range of the current tensor, not a history
            lo, hi = self.observer.checked_range(self.rows(x))
            self.observer.reset_to(lo, hi)
        elif self.granularity == "per_tensor" and self.observer.plain_range:
            # reduced as the tensor lies in memory: under torch.compile a flattened view of a channels-last
            # activation is gathered element by element (ResNet-20: 1.12x a float step instead of 0.99x)
            lo, hi = tensor_aminmax(x)
            check_range(lo, hi, self)
            self.observer.update(lo, hi)
        else:
            self.observer(self.rows(x))
        if not self.calibrating:  # calibration sets the qparams once, in finalize_calibration()
            self.update_qparams()

    @torch.no_grad()
    def update_qparams(self) -> None:
        """Recompute scale and zero point from the observer's range."""
        scale, zp = qparams_from_range(
            self.observer.min_val, self.observer.max_val, self.qmin, self.qmax, self.symmetric
        )
        self.scale.copy_(scale)
        if not self.symmetric:
            self.zero_point.copy_(zp)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.reconstruction is not None:
            return self.reconstruction.quantize(self, x)
        return self.own_quantize(x)

    def own_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """This quantizer's own rule: the fixed codes if set, else nearest rounding on the grid."""
        if self.codes.numel():
            out = self.apply_rows(
                self.codes.float(),
                lambda c: (c - self.broadcast_per_group(self.zero_point, c)) * self.broadcast_per_group(self.scale, c),
            )
            return out.to(x.dtype)
        return fake_quantize(
            x, self.scale, self.zero_point, self.qmin, self.qmax, self.granularity, self.axis, self.group_size
        )

    def scale_values(self) -> torch.Tensor:
        return self.scale.detach()

    def export_grid(self) -> ExportGrid:
        """Its scale and integer zero point per tensor, channel or group (fixed codes lie on the same grid)."""
        scale, zp = self.scale.detach().float(), self.zero_point.detach().to(torch.int32)
        return grid_for(scale, zp, self.qmin, self.qmax, self.granularity, self.axis, self.group_size)

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        zp = self.zero_point.float()
        return (self.qmin - zp) * self.scale, (self.qmax - zp) * self.scale

    @torch.no_grad()
    def sync(self) -> None:
        self.observer.sync()
        if self.observer.has_range:
            self.update_qparams()
