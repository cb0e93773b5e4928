"""What a post-training reconstruction attaches to an observer quantizer while it trains one unit.

AdaRound's learned rounding, an LSQ-trained step (BRECQ, QDrop) and QDrop's random dropping exist only
while :mod:`lightning_quant.ptq.reconstruction` trains a unit: it attaches a :class:`ReconstructionState`
to the quantizer, and on detaching hardens the rounding into the quantizer's fixed integer codes and writes
the learned step back into its ``scale``. The quantizer itself only asks its attachment to quantize.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from lightning_quant.quantizers.finite import check_tensor
from lightning_quant.quantizers.functional import round_ste

if TYPE_CHECKING:
    from lightning_quant.quantizers.affine import ObserverQuantizer


class ReconstructionState(nn.Module):
    """Training-time quantization of one :class:`ObserverQuantizer`: learned rounding, learned step, dropping.

    ``rounding`` (an AdaRound module) replaces the quantizer's rounding of the weight; ``step`` (a parameter,
    initialised from the quantizer's scale) replaces its fixed step for activations; with ``drop_prob`` > 0,
    each element stays in float with that probability while the quantizer is in training mode.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.rounding: Optional[nn.Module] = None
        self.step: Optional[nn.Parameter] = None

    def changes_output(self, training: bool) -> bool:
        """Whether quantization differs from the quantizer's own (its fused fast path must not run)."""
        return self.rounding is not None or self.step is not None or (self.drop_prob > 0 and training)

    def is_empty(self) -> bool:
        """Nothing attached any more: the quantizer may drop this state."""
        return self.rounding is None and self.step is None and self.drop_prob == 0

    def quantize(self, q: ObserverQuantizer, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantized on ``q``'s grid with what is attached (the quantizer's own rule for the rest)."""
        if self.rounding is not None:
            return self.rounding(x)
        if q.codes.numel():  # fixed codes stand as they are
            return q.own_quantize(x)
        if self.step is not None:
            if q.training:  # a learned step: a NaN would reach it through the gradient
                check_tensor(x, q)
            out = q.apply_rows(x, lambda v: self._learned_step(q, v))
        else:
            out = q.own_quantize(x)
        if self.drop_prob > 0 and q.training:
            keep_float = torch.rand_like(x) < self.drop_prob
            out = torch.where(keep_float, x, out)
        return out

    def _learned_step(self, q: ObserverQuantizer, v: torch.Tensor) -> torch.Tensor:
        """LSQ fake quantization with ``q``'s (fixed) zero point and the trainable step."""
        assert self.step is not None
        per_step = v.numel() // q.num_groups if q.role == "weight" else v[0].numel()
        g = 1.0 / math.sqrt(per_step * max(q.qmax, 1))
        s = q.broadcast_per_group(self.step, v)
        s = s * g + (s - s * g).detach()  # gradient scaled by g, value unchanged
        zp = q.broadcast_per_group(q.zero_point.float(), v)
        return (torch.clamp(round_ste(v / s) + zp, q.qmin, q.qmax) - zp) * s
