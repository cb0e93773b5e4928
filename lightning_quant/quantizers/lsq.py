"""LSQ and LSQ+: a learned step size (and optionally a learned offset) trained with the task loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_quant.quantizers import kernels
from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.finite import check_tensor
from lightning_quant.quantizers.functional import grad_scale, round_ste, row_aminmax


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    """Learned Step Size Quantization (Esser et al., 2020): ``v̂ = s·round(clip(v/s, qmin, qmax))``.

    The step ``s`` is a parameter whose gradient is scaled by ``1/sqrt(N·Qp)`` (N elements per step: per
    group for weights, per sample for activations) and initialised to ``2·mean|v|/sqrt(Qp)``. With
    ``learn_offset`` (LSQ+) an offset ``β`` is learned too and both start from the first batch's min/max.
    Example::

        q = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), role="weight", num_groups=64)
    """

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.scale = nn.Parameter(torch.ones(num_groups))
        self.offset = nn.Parameter(torch.zeros(num_groups)) if cfg.learn_offset else None

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        rows = self.rows(x.detach()).float()
        if self.offset is not None:
            lo, hi = row_aminmax(rows)
            step = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-8)
            self.scale.copy_(step)
            self.offset.copy_(lo - self.qmin * step)
            return
        init = 2 * rows.abs().mean(dim=1) / math.sqrt(max(self.qmax, 1))
        self.scale.copy_(init.clamp_min(1e-8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._initialized and self.fake_quant_enabled:  # a learned step observes nothing: straight to quantize
            return self.quantize(x)
        return super().forward(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        per_step = x.numel() // (self.num_groups if self.role == "weight" else x.shape[0])
        g = 1.0 / math.sqrt(per_step * max(self.qmax, 1))
        if self.offset is None and kernels.applies(x):
            axis = None if self.granularity == "per_tensor" else self.axis
            if self.granularity == "per_group":
                out = kernels.lsq_fake_quant(self.rows(x), self.scale, g, self.qmin, self.qmax, 0, self)
                return out.reshape(x.shape)
            return kernels.lsq_fake_quant(x, self.scale, g, self.qmin, self.qmax, axis, self)
        if self.training:  # a NaN input would make the learned step NaN through its gradient
            check_tensor(x, self)

        def fq(v: torch.Tensor) -> torch.Tensor:
            s = self.per_group(grad_scale(self.scale, g), v)
            if self.offset is None:
                return round_ste(torch.clamp(v / s, self.qmin, self.qmax)) * s
            b = self.per_group(grad_scale(self.offset, g), v)
            return round_ste(torch.clamp((v - b) / s, self.qmin, self.qmax)) * s + b

        return self.apply_rows(x, fq)

    def scale_values(self) -> torch.Tensor:
        return self.scale.detach().abs()

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale_values()
        b = self.offset.detach() if self.offset is not None else torch.zeros_like(s)
        return s * self.qmin + b, s * self.qmax + b
