"""Dynamic per-token activation quantization (the ``dynamic`` method): W8A8 for transformers.

Each token (a row along the last dimension) gets its own symmetric step ``max|x| / qmax`` computed on the
fly, so nothing is calibrated and no range is stored; outliers in one token do not cost the others
their precision. This is what int8 runtimes call dynamic quantization.
"""

from __future__ import annotations

import torch

from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.functional import round_ste
from lightning_quant.quantizers.grid import ExportGrid, NoIntegerGrid


@register_quantizer("dynamic")
class DynamicQuantizer(Quantizer):
    """Symmetric fake quantization with a step per token, recomputed on every call. Example::

    q = DynamicQuantizer(QuantizerConfig(method="dynamic", bits=8, granularity="per_token"), "activation")
    y = q(torch.randn(2, 16, 384))  # 32 tokens, 32 steps
    """

    roles = ("activation",)
    granularities = ("per_token",)  # type: ignore[assignment]

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, 1)
        self.set_signed(True)
        self._auto_sign = False

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        step = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / self.qmax
        return torch.clamp(round_ste(x / step), self.qmin, self.qmax) * step

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        inf = torch.tensor([float("inf")])
        return -inf, inf  # the step follows each token's range: nothing is clipped

    def export_grid(self) -> ExportGrid:
        """No grid: the step is recomputed for every token at run time, so there is no static grid to export."""
        return NoIntegerGrid(
            f"{type(self).__name__} computes a step per token at run time; export writes static grids only "
            "(observer, LSQ and PACT quantizers)"
        )

    def extra_repr(self) -> str:
        return f"{self.role}, bits={self.bits}, per_token (dynamic)"
