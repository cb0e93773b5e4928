"""LSQ and LSQ+: a learned step size (and optionally a learned offset) trained with the task loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_quant.quantizers import _kernels as kernels
from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.finite import check_tensor
from lightning_quant.quantizers.functional import grad_scale, is_distributed, round_ste, row_aminmax
from lightning_quant.quantizers.grid import ExportGrid, NoIntegerGrid, grid_for

MIN_STEP = 1e-8  # the smallest step the forward uses: a learned step never reaches zero or goes negative


@dataclass
class LSQOptions:
    """The ``lsq`` method's own keys of a ``weights``/``activations`` section."""

    learn_offset: bool = False  # LSQ+: learn an offset as well as the step


@register_quantizer("lsq", options=LSQOptions)
class LSQQuantizer(Quantizer):
    """Learned Step Size Quantization (Esser et al., 2020): ``v̂ = s·round(clip(v/s, qmin, qmax))``.

    The step ``s`` is a parameter whose gradient is scaled by ``1/sqrt(N·Qp)`` (N elements per step: per
    group for weights, per sample for activations) and initialised to ``2·mean|v|/sqrt(Qp)``. The forward
    uses ``max(|s|, MIN_STEP)``, so the step stays positive by construction whatever the optimizer does
    (Adam at lr 1e-2 moves a 4-bit weight step of ~0.005 across zero in one update); for ``s > MIN_STEP`` this
    is ``s`` itself, value and gradient. With ``learn_offset`` (LSQ+) an offset ``β`` is learned too and both
    start from the first batch's min/max. Example::

        q = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), role="weight", num_groups=64)

    Activations whose sign is left to the data (``signed: null``) get an unsigned ``b``-bit code with an integer
    zero point ``z``: ``v̂ = s·(clamp(round(v/s) + z, 0, 2^b−1) − z)``, i.e. the range ``[−z, 2^b−1−z]``. It is
    LSQ+'s offset restricted to whole steps (``β = −z·s``), so it stays an exact integer grid for export. ``z``
    is fixed from the first batch's ``lo = min v`` and ``hi = max v`` as the negative share of the levels,
    ``z = round((2^b−1)·(−lo)/(hi−lo))`` (0 when ``lo ≥ 0``); ``z ≥ 2^(b−1)`` gives the usual signed grid.
    After ReLU ``z = 0`` (unsigned, as in the paper); after GELU/SiLU (minimum −0.17/−0.28) ``z`` is 0 or 1 at
    2–4 bits, so the levels go to the positive range that holds the signal instead of half of them to a sliver of
    negatives (the old rule, signed at any negative value, used 2 of 4 levels); zero-mean inputs get the signed
    grid. Because ``z`` counts steps, not values, the negative share of the range stays as ``s`` is learned.
    """

    zero_point: torch.Tensor  # a buffer, registered only on a shifted grid (see _set_zero_point)

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.scale = nn.Parameter(torch.ones(num_groups))
        self.offset = nn.Parameter(torch.zeros(num_groups)) if cfg.options.learn_offset else None
        # ``zero_point`` (a buffer) exists only on a shifted grid, so checkpoints written before it load unchanged

    # -- grid ------------------------------------------------------------------------------------------
    def _refresh_range(self) -> None:
        super()._refresh_range()
        zero_point = getattr(self, "zero_point", None)
        if zero_point is not None:  # unsigned code shifted down by z: [-z, 2^b - 1 - z]
            self.qmin, self.qmax = self.qmin - int(zero_point), self.qmax - int(zero_point)

    def _set_zero_point(self, z: int) -> None:
        if getattr(self, "zero_point", None) is None:
            self.register_buffer("zero_point", torch.tensor(z, dtype=torch.int32, device=self.scale.device))
        else:
            self.zero_point.fill_(z)
        self._refresh_range()

    def _choose_grid(self, x: torch.Tensor) -> None:
        """Zero point from the negative share of the first batch's range (see the class docstring)."""
        lo, hi = torch.aminmax(x.detach().float())
        if is_distributed():  # every rank must choose the same grid: use the global range
            both = torch.stack([-lo, hi])
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
            lo, hi = -both[0], both[1]
        levels = 2**self.bits - 1
        if float(lo) >= 0:
            z = 0
        elif float(hi) <= float(lo):
            z = levels
        else:
            z = round(levels * float(-lo) / float(hi - lo))
        signed = z >= 2 ** (self.bits - 1)
        self.set_signed(signed)
        if (z > 0 and not signed) or getattr(self, "zero_point", None) is not None:
            self._set_zero_point(0 if signed else z)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "zero_point" in state_dict:
            self._set_zero_point(int(state_dict[prefix + "zero_point"]))
        elif prefix + "scale" in state_dict and getattr(self, "zero_point", None) is not None:
            del self._buffers["zero_point"]  # the loaded state has no shifted grid
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- state -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        if self._auto_sign and self.role == "activation" and self.offset is None:
            self._choose_grid(x)
        rows = self.rows(x.detach()).float()
        if self.offset is not None:
            lo, hi = row_aminmax(rows)
            step = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-8)
            self.scale.copy_(step)
            self.offset.copy_(lo - self.qmin * step)
            return
        init = 2 * rows.abs().mean(dim=1) / math.sqrt(max(self.qmax, 1))
        self.scale.copy_(init.clamp_min(1e-8))

    def step(self) -> torch.Tensor:
        """The step the forward uses, ``max(|s|, MIN_STEP)``, differentiable in ``s``."""
        return self.scale.abs().clamp_min(MIN_STEP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._initialized and self.fake_quant_enabled:  # a learned step observes nothing: straight to quantize
            return self.quantize(x)
        return super().forward(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        per_step = x.numel() // (self.num_groups if self.role == "weight" else x.shape[0])
        g = 1.0 / math.sqrt(per_step * max(self.qmax, 1))
        step = self.step()
        if self.offset is None and kernels.applies(x):
            axis = None if self.granularity == "per_tensor" else self.axis
            if self.granularity == "per_group":
                out = kernels.lsq_fake_quant(self.rows(x), step, g, self.qmin, self.qmax, 0, self)
                return out.reshape(x.shape)
            return kernels.lsq_fake_quant(x, step, g, self.qmin, self.qmax, axis, self)
        if self.training:  # a NaN input would make the learned step NaN through its gradient
            check_tensor(x, self)

        def fq(v: torch.Tensor) -> torch.Tensor:
            s = self.broadcast_per_group(grad_scale(step, g), v)
            if self.offset is None:
                return round_ste(torch.clamp(v / s, self.qmin, self.qmax)) * s
            b = self.broadcast_per_group(grad_scale(self.offset, g), v)
            return round_ste(torch.clamp((v - b) / s, self.qmin, self.qmax)) * s + b

        return self.apply_rows(x, fq)

    def scale_values(self) -> torch.Tensor:
        """The step the forward uses (what diagnostics log), not the raw parameter."""
        return self.step().detach()

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale_values()
        b = self.offset.detach() if self.offset is not None else torch.zeros_like(s)
        return s * self.qmin + b, s * self.qmax + b

    def export_grid(self) -> ExportGrid:
        """The step the forward uses with zero point 0, or ``z`` on a shifted grid (its codes then start at 0)."""
        if self.offset is not None:
            return NoIntegerGrid(
                f"{type(self).__name__} (LSQ+) learned a real-valued offset; QuantizeLinear needs an integer one"
            )
        shift = int(getattr(self, "zero_point", 0))  # [-z, 2^b - 1 - z] is the codes [0, 2^b - 1] with zero point z
        scale = self.scale_values().float()
        zp = torch.full_like(scale, shift, dtype=torch.int32)
        return grid_for(scale, zp, self.qmin + shift, self.qmax + shift, self.granularity, self.axis, self.group_size)
