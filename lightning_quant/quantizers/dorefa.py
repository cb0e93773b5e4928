"""DoReFa-Net quantizers: tanh-normalised weights and activations clipped to ``[0, 1]``."""

from __future__ import annotations

import torch

from lightning_quant.quantizers.base import Quantizer, register_quantizer
from lightning_quant.quantizers.functional import round_ste
from lightning_quant.quantizers.grid import ExportGrid, NoIntegerGrid


def _q(x: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    return round_ste(x * levels) / levels


@register_quantizer("dorefa")
class DoReFaQuantizer(Quantizer):
    """DoReFa (Zhou et al., 2016), stateless.

    Weights: ``2·q_k(tanh(w)/(2·max|tanh w|) + ½) − 1`` (``sign(w)·mean|w|`` at 1 bit). Activations:
    ``q_k(clip(x, 0, 1))``, or on ``[-1, 1]`` for signed inputs. Example::

        q = DoReFaQuantizer(QuantizerConfig(method="dorefa", bits=4), role="weight")
    """

    granularities = ("per_tensor",)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        k = self.bits
        if self.role == "weight":
            if k == 1:
                scale = x.detach().abs().mean()
                return (torch.sign(x) - x).detach() * scale + x * scale
            t = torch.tanh(x)
            t = t / (2 * t.detach().abs().max().clamp_min(1e-8)) + 0.5
            return 2 * _q(t, k) - 1
        if self.qmin < 0:  # signed (a Python value: no tensor read, so no graph break under torch.compile)
            return 2 * _q((torch.clamp(x, -1, 1) + 1) / 2, k) - 1
        return _q(torch.clamp(x, 0, 1), k)

    def scale_values(self) -> torch.Tensor:
        levels = 2**self.bits - 1
        return torch.full((1,), (2.0 if self.role == "weight" or self.qmin < 0 else 1.0) / levels)

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = -1.0 if self.role == "weight" or self.qmin < 0 else 0.0
        return torch.tensor([lo]), torch.tensor([1.0])

    def export_grid(self) -> ExportGrid:
        """No grid: export supports no DoReFa levels (the weight and signed ones have no level at zero)."""
        if self.role == "weight" or self.qmin < 0:
            why = "its levels 2j/(2^b-1) - 1 sit half a step off zero, with no integer zero point on their step"
        else:
            why = "its activation levels j/(2^b-1) are not exported"
        return NoIntegerGrid(f"{type(self).__name__}: {why}; export supports observer, LSQ and PACT quantizers")
