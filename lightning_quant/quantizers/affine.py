"""Observer-driven affine fake quantization (the ``observer`` method): fixed scales, fused torch kernels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.quantizers import _kernels as kernels
from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.finite import NonFiniteInputError, check_range, message
from lightning_quant.quantizers.functional import (
    fake_quantize,
    qparams_from_range,
    round_ste,
    tensor_aminmax,
)
from lightning_quant.quantizers.grid import ExportGrid, grid_for
from lightning_quant.quantizers.observers import EMAObserver, build_observer, observer_names
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
    observer defines. Once ``observer_enabled`` is off the scale is frozen. Post-training quantization
    adds three things: ``learn_scale(True)`` makes the step a parameter trained LSQ-style (BRECQ/QDrop),
    ``drop_prob`` keeps a random part of the elements in float while training (QDrop), and ``set_codes``
    fixes a weight's integer codes (AdaRound's learned rounding, Bit-Split's stitched planes), which are
    then used instead of rounding the float weight. Example::

        q = ObserverQuantizer(QuantizerConfig(bits=8, observer="ema"), role="activation")
        y = q(x)
    """

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
        self.drop_prob = 0.0
        self.rounding: Optional[nn.Module] = None  # AdaRound while it is being learned
        self.observer.qualname = self.qualname

    def set_qualname(self, name: str) -> None:
        super().set_qualname(name)
        self.observer.qualname = name  # the observer checks the ranges it computes and names its quantizer

    # -- post-training extras ------------------------------------------------------------------------------
    def learn_scale(self, enable: bool) -> None:
        """Turn the step into a trainable parameter (LSQ gradient) or back into a fixed buffer."""
        value = self.scale.detach().clone()
        del self.scale
        if enable:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

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
        """True for plain observer fake quantization (ranges from the observer alone): no learned step, fixed codes,
        learned rounding or QDrop. Only then may the fused eager kernels replace the generic path."""
        return (
            self.rounding is None
            and not self.codes.numel()
            and not isinstance(self.scale, nn.Parameter)
            and not (self.drop_prob > 0 and self.training)
        )

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
        if self.rounding is not None:
            return self.rounding(x)
        if self.codes.numel():
            out = self.apply_rows(
                self.codes.float(),
                lambda c: (c - self.broadcast_per_group(self.zero_point, c)) * self.broadcast_per_group(self.scale, c),
            )
            return out.to(x.dtype)
        if isinstance(self.scale, nn.Parameter):
            out = self.apply_rows(x, self._learned_step)
        else:
            out = fake_quantize(
                x, self.scale, self.zero_point, self.qmin, self.qmax, self.granularity, self.axis, self.group_size
            )
        if self.drop_prob > 0 and self.training:
            keep_float = torch.rand_like(x) < self.drop_prob
            out = torch.where(keep_float, x, out)
        return out

    def _learned_step(self, v: torch.Tensor) -> torch.Tensor:
        """LSQ fake quantization with this quantizer's (fixed) zero point and a trainable step."""
        per_step = v.numel() // self.num_groups if self.role == "weight" else v[0].numel()
        g = 1.0 / math.sqrt(per_step * max(self.qmax, 1))
        s = self.broadcast_per_group(self.scale, v)
        s = s * g + (s - s * g).detach()  # gradient scaled by g, value unchanged
        zp = self.broadcast_per_group(self.zero_point.float(), v)
        return (torch.clamp(round_ste(v / s) + zp, self.qmin, self.qmax) - zp) * s

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
