"""Observer-driven affine fake quantization (the ``observer`` method): fixed scales, fused torch kernels."""

from __future__ import annotations

import torch

from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.functional import fake_quantize, qparams_from_range
from lightning_quant.quantizers.observers import build_observer


@register_quantizer("observer")
class ObserverQuantizer(Quantizer):
    """Uniform affine fake quantization whose range comes from an observer (min-max, EMA, percentile, MSE).

    Weights are re-observed on every training step (their current range); activations accumulate as the
    observer defines. Once ``observer_enabled`` is off the scale is frozen. Example::

        q = ObserverQuantizer(QuantizerConfig(bits=8, observer="ema"), role="activation")
        y = q(x)
    """

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.observer = build_observer(
            cfg.observer,
            num_groups,
            bits=cfg.bits,
            signed=True if cfg.signed is None else cfg.signed,
            momentum=cfg.momentum,
            percentile=cfg.percentile,
        )
        self.symmetric = cfg.symmetric
        self.register_buffer("scale", torch.ones(num_groups))
        self.register_buffer("zero_point", torch.zeros(num_groups, dtype=torch.int32))

    def initialize(self, x: torch.Tensor) -> None:
        self.observe(x)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if self.role == "weight":  # weights: the range of the current tensor, not a history
            self.observer.reset_to(*self.observer.batch_range(self.rows(x)))
        else:
            self.observer(self.rows(x))
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
        return fake_quantize(
            x, self.scale, self.zero_point, self.qmin, self.qmax, self.granularity, self.axis, self.group_size
        )

    def scale_values(self) -> torch.Tensor:
        return self.scale.detach()

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        zp = self.zero_point.float()
        return (self.qmin - zp) * self.scale, (self.qmax - zp) * self.scale

    @torch.no_grad()
    def sync(self) -> None:
        self.observer.sync()
        if self.observer.has_range:
            self.update_qparams()
