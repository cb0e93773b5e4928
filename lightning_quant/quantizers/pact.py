"""PACT: activations clipped at a learned level ``α``, then quantized uniformly on ``[0, α]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.functional import round_ste
from lightning_quant.quantizers.grid import ExportGrid, grid_for
from lightning_quant.registry import OptionError

_INIT_SAMPLES = 1 << 16  # elements of the first batch searched for the initial clip
_INIT_CANDIDATES = 100  # clip candidates, evenly spaced up to the batch's largest magnitude


@dataclass
class PACTOptions:
    """The ``pact`` method's own keys of an ``activations`` section: the clip level ``α``."""

    clip_init: Optional[float] = None  # initial clip alpha; None: the MSE-optimal clip of the first batch
    clip_decay: float = 1e-4  # L2 penalty on alpha, applied as a gradient term

    def check(self) -> None:
        if self.clip_init is not None and not self.clip_init > 0:
            raise OptionError("clip_init", self.clip_init, "must be positive")
        if not self.clip_decay >= 0:
            raise OptionError("clip_decay", self.clip_decay, "must be >= 0")


@register_quantizer("pact", options=PACTOptions)
class PACTQuantizer(Quantizer):
    """Parameterized Clipping Activation (Choi et al., 2018) for activations.

    ``y = clip(x, 0, α)`` (``[-α, α]`` for signed inputs) then ``k``-bit rounding with step ``α/qmax``.
    ``∂y/∂α = 1[x ≥ α]``; the L2 penalty ``clip_decay·α²/2`` is added to α's gradient so the user's loss
    is untouched. Example::

        q = PACTQuantizer(QuantizerConfig(method="pact", bits=4), role="activation")

    ``α`` starts at ``clip_init`` when the recipe sets it (the paper trains from scratch with 10). Left unset,
    it is the clip that minimises the quantization MSE of the first batch at this bit width: fine-tuning
    starts from a float model, and a fixed 10 puts a 2-bit step (3.3) above most activations, while α learns
    only from inputs above it, so it barely moves. A high percentile would ignore the bit width; the MSE clip
    trades clipping against rounding for the levels there are. At least 2 bits: a 1-bit signed code has no
    positive level (its step ``α/0`` is infinite), so 1 bit is refused at construction.
    """

    roles = ("activation",)
    granularities = ("per_tensor",)

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        if cfg.bits < 2:
            raise ValueError(f"PACT needs at least 2 activation bits, got bits={cfg.bits} (allowed: 2 to 8)")
        super().__init__(cfg, role, num_groups)
        opts: PACTOptions = cfg.options
        self.from_data = opts.clip_init is None
        self.alpha = nn.Parameter(torch.tensor([1.0 if opts.clip_init is None else float(opts.clip_init)]))
        decay = opts.clip_decay
        if decay > 0:
            self.alpha.register_hook(lambda g: g + decay * self.alpha.detach())

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        if self.from_data:
            self.alpha.fill_(mse_clip(x, self.qmax, bool(self.signed)))

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

    def export_grid(self) -> ExportGrid:
        """Step ``|α|/qmax`` with zero point 0 on codes ``[0, qmax]``, or ``[−qmax, qmax]`` for signed inputs."""
        scale = (self.alpha.detach().abs() / self.qmax).float().reshape(-1)
        zp = torch.zeros_like(scale, dtype=torch.int32)
        qmin = -self.qmax if bool(self.signed) else self.qmin
        return grid_for(scale, zp, qmin, self.qmax, self.granularity, self.axis, self.group_size)


def mse_clip(x: torch.Tensor, qmax: int, signed: bool) -> float:
    """The clip ``α`` (of ``_INIT_CANDIDATES`` up to max|x|) whose ``qmax``-level PACT grid has the least MSE on ``x``.

    Searched on an evenly strided sample of at most ``_INIT_SAMPLES`` elements; 1.0 for an all-zero tensor.
    """
    flat = x.detach().float().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _INIT_SAMPLES)]
    top = float(sample.abs().max()) if signed else float(sample.clamp_min(0).max())
    if not top > 0:
        return 1.0
    alphas = torch.linspace(top / _INIT_CANDIDATES, top, _INIT_CANDIDATES, device=sample.device).reshape(-1, 1)
    lo = -alphas if signed else torch.zeros_like(alphas)
    step = alphas / qmax
    y = torch.round(torch.minimum(torch.maximum(sample, lo), alphas) / step) * step
    return float(alphas[((y - sample) ** 2).mean(dim=1).argmin(), 0])
