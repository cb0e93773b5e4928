"""AdaRound's learned rounding (Nagel et al., 2020) for one weight tensor, on top of a calibrated quantizer.

The grid (scale, zero point) comes from an :class:`ObserverQuantizer` and stays fixed; only the choice
between rounding down and up is learned, through ``h(V) = clip(σ(V)(ζ−γ)+γ, 0, 1)``.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_quant.quantizers.affine import ObserverQuantizer

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid


class AdaRound(nn.Module):
    """Soft rounding of ``weight`` on ``quantizer``'s grid: ``s·(clip(floor(W/s) + h(V) + zp) − zp)``.

    ``V`` starts where ``h(V)`` equals the fractional part of ``W/s``, so training begins at the float
    weight. ``regularizer(beta)`` pushes ``h`` to 0 or 1; ``hard_codes()`` gives the final integer codes
    (``h = 1[V ≥ 0]``) for :meth:`ObserverQuantizer.set_codes`. Example::

        ada = AdaRound(layer.weight_quantizer, layer.weight)
        loss = mse(layer_output_with(ada(layer.weight)), target) + 0.01 * ada.regularizer(beta=20)
        layer.weight_quantizer.set_codes(ada.hard_codes())
    """

    floor: torch.Tensor  # buffer: the weight's codes rounded down

    def __init__(self, quantizer: ObserverQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.quantizer = [quantizer]  # a list: not registered as a submodule (it belongs to the layer)
        w = weight.detach()
        s, zp = self._grid(w)
        scaled = w / s
        self.register_buffer("floor", torch.floor(scaled))
        frac = (scaled - self.floor).clamp(0.01, 0.99)  # keep the inverse sigmoid finite
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        self.soft = True

    def _grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.quantizer[0]
        view = q.rows(w) if q.granularity == "per_group" else w
        return q.broadcast_per_group(q.scale.detach(), view).expand_as(view).reshape(w.shape), q.broadcast_per_group(
            q.zero_point.float(), view
        ).expand_as(view).reshape(w.shape)

    def h(self) -> torch.Tensor:
        """Rounding offsets in [0, 1] (soft), or exactly 0/1 once ``soft`` is off."""
        if not self.soft:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = self.quantizer[0]
        s, zp = self._grid(weight)
        codes = torch.clamp(self.floor + self.h() + zp, q.qmin, q.qmax)
        return (codes - zp) * s

    def regularizer(self, beta: float) -> torch.Tensor:
        """``Σ 1 − |2h − 1|^β``: zero only when every offset is exactly 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """The integer codes (zero point included) with every rounding decision made."""
        q = self.quantizer[0]
        _, zp = self._grid(self.floor)
        return torch.clamp(self.floor + (self.alpha >= 0).float() + zp, q.qmin, q.qmax)
