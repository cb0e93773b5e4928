"""PACT: activations clipped at a learned level ``α``, then quantized uniformly on ``[0, α]``."""

from __future__ import annotations

import torch
from torch import nn

from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.functional import round_ste


@register_quantizer("pact")
class PACTQuantizer(Quantizer):
    """Parameterized Clipping Activation (Choi et al., 2018) for activations.

    ``y = clip(x, 0, α)`` (``[-α, α]`` for signed inputs) then ``k``-bit rounding with step ``α/qmax``.
    ``∂y/∂α = 1[x ≥ α]``; the L2 penalty ``clip_decay·α²/2`` is added to α's gradient so the user's loss
    is untouched. Example::

        q = PACTQuantizer(QuantizerConfig(method="pact", bits=4), role="activation")
    """

    roles = ("activation",)
    granularities = ("per_tensor",)

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.alpha = nn.Parameter(torch.tensor([float(cfg.clip_init)]))
        decay = cfg.clip_decay
        if decay > 0:
            self.alpha.register_hook(lambda g: g + decay * self.alpha.detach())

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.abs()
        if self.qmin < 0:  # signed (a Python value: no graph break under torch.compile)
            y = torch.minimum(torch.maximum(x, -alpha), alpha)
        else:
            y = torch.minimum(torch.relu(x), alpha)
        step = alpha.detach() / self.qmax
        return round_ste(y / step) * step

    def scale_values(self) -> torch.Tensor:
        return self.alpha.detach().abs() / self.qmax

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha.detach().abs()
        return (-a if bool(self.signed) else torch.zeros_like(a)), a
