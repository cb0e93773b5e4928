"""DSQ: differentiable soft quantization with a learned clip range and a learned tanh sharpness."""

from __future__ import annotations

import torch
from torch import nn

from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.functional import row_aminmax
from lightning_quant.quantizers.grid import ExportGrid, NoIntegerGrid


@register_quantizer("dsq")
class DSQQuantizer(Quantizer):
    """Differentiable Soft Quantization (Gong et al., 2019).

    The forward pass rounds to ``2^b`` levels on ``[l, u]``; the backward pass follows the soft curve
    ``⌊t⌋ + ½ + ½·s·tanh(k(t − ⌊t⌋ − ½))`` with ``s = 1/(1−α)``, ``k = ln(2/α − 1)``. ``l``, ``u`` and ``α``
    are learned; α starts at 0.2 and is kept in ``[1e-3, 0.5]`` (small α means a sharp, nearly hard curve).
    Example::

        q = DSQQuantizer(QuantizerConfig(method="dsq", bits=4), role="activation")
    """

    granularities = ("per_tensor", "per_channel")

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.lower = nn.Parameter(torch.zeros(num_groups))
        self.upper = nn.Parameter(torch.ones(num_groups))
        self.alpha = nn.Parameter(torch.tensor([0.2]))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        lo, hi = row_aminmax(self.rows(x))
        self.lower.copy_(lo)
        self.upper.copy_(torch.maximum(hi, lo + 1e-6))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        lower = self.broadcast_per_group(self.lower, x)
        upper = self.broadcast_per_group(self.upper, x)
        levels = 2**self.bits - 1
        delta = (upper - lower).clamp_min(1e-8) / levels
        t = (torch.minimum(torch.maximum(x, lower), upper) - lower) / delta
        alpha = self.alpha.clamp(1e-3, 0.5)
        s = 1.0 / (1.0 - alpha)
        k = torch.log(2.0 / alpha - 1.0)
        base = torch.floor(t).detach()
        soft = base + 0.5 + 0.5 * s * torch.tanh(k * (t - base - 0.5))
        hard = torch.round(t).detach()
        y = soft + (hard - soft).detach()
        return lower + delta * y

    def scale_values(self) -> torch.Tensor:
        return ((self.upper - self.lower).detach() / (2**self.bits - 1)).abs()

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lower.detach(), self.upper.detach()

    def export_grid(self) -> ExportGrid:
        """No grid: its levels start at the learned ``lower``, a real-valued offset, not an integer zero point."""
        return NoIntegerGrid(
            f"{type(self).__name__} levels start at its learned lower bound, a real-valued offset; QuantizeLinear "
            "needs an integer zero point (export supports observer, LSQ and PACT quantizers)"
        )
