"""Binary and ternary quantizers: BinaryConnect (Courbariaux et al., 2015), BNN (Hubara et al., 2016), XNOR-Net
(Rastegari et al., 2016), Bi-Real (Liu et al., 2018), IR-Net (Qin et al., 2020), ReActNet's RSign (Liu et al.,
2020), Network Sketching (Guo et al., 2017), TWN (Li et al., 2016) and TTQ (Zhu et al., 2017). Definitions and
defaults follow those papers, each cited again on its class; each is a registered quantizer method, so recipes
select them like any other (``weights.method: xnor``).

Binarizers keep the latent real-valued weight as the layer's parameter and return its binary (or ternary)
version in the forward pass; their backward passes are the methods' straight-through estimators.
Quantizers with annealed estimators (IR-Net) read ``progress`` (0 → 1), which the Binarization callback
sets from the training step.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.quantizers.base import Quantizer, QuantizerConfig, Role, register_quantizer
from lightning_quant.quantizers.grid import ExportGrid, NoIntegerGrid
from lightning_quant.quantizers.state import OptionalStateModule


class _SignSTE(torch.autograd.Function):
    """``sign`` forward (0 maps to +1); backward is the gradient times ``window(x)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kind: str, t: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.kind, ctx.t = kind, t
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        if ctx.kind == "identity":  # BinaryConnect's weights: plain straight-through
            window = torch.ones_like(x)
        elif ctx.kind == "hardtanh":  # BNN: 1[|x| <= 1]
            window = (x.abs() <= 1).to(grad.dtype)
        elif ctx.kind == "approx":  # Bi-Real's ApproxSign: 2 - 2|x| inside [-1, 1]
            window = (2 - 2 * x.abs()).clamp_min(0)
        else:  # IR-Net's error decay estimator: k·t·(1 − tanh²(t·x)), k = max(1/t, 1)
            t = ctx.t
            window = max(1.0 / t, 1.0) * t * (1 - torch.tanh(t * x).pow(2))
        return grad * window, None, None


def sign_ste(x: torch.Tensor, kind: str = "hardtanh", t: float = 1.0) -> torch.Tensor:
    """Binarize ``x`` to ±1 with the straight-through estimator ``kind``: identity, hardtanh, approx or ede."""
    return _SignSTE.apply(x, kind, t)


def _channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).mean(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


class BinaryQuantizer(Quantizer):
    """Base for binarizers: 1 bit, nothing to observe; ``bits_per_weight`` is what packing stores."""

    granularities: ClassVar[tuple] = ("per_tensor", "per_channel")
    clip_latent: ClassVar[bool] = False  # the callback clips latent weights to [-1, 1] after each step
    bits_per_weight: ClassVar[int] = 1

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.progress = 0.0

    def initialize(self, x: torch.Tensor) -> None:
        """Binarizers need no range."""

    def export_grid(self) -> ExportGrid:
        """No integer grid: binary layers are exported in the packed format instead."""
        return NoIntegerGrid(f"{type(self).__name__} is binary; export it with format='packed' (a .packed file)")

    def extra_repr(self) -> str:
        return f"{self.role}, {type(self).__name__}"


@register_quantizer("binaryconnect")
class BinaryConnectQuantizer(BinaryQuantizer):
    """BinaryConnect (Courbariaux et al., 2015): ``sign(w)`` with an identity STE; latent weights clipped to
    [−1, 1]. ``cfg.stochastic`` is not exposed: the deterministic variant is the usual one. Weights only."""

    roles = ("weight",)
    clip_latent = True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x, "identity")


@register_quantizer("bnn")
class BNNQuantizer(BinaryQuantizer):
    """BNN (Hubara et al., 2016): ``sign`` of weights and activations with the hard-tanh STE ``1[|x| ≤ 1]``."""

    clip_latent = True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x, "hardtanh")


@register_quantizer("xnor")
class XNORQuantizer(BinaryQuantizer):
    """XNOR-Net (Rastegari et al., 2016): weights ``α_c·sign(W)`` with ``α_c = mean|W_c|`` per output filter;
    activations ``K·sign(I)`` with ``K`` the mean ``|I|`` of each sample (the paper smooths a per-position
    channel mean with a k×k box filter; one scale per sample is the simplification used here)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            return sign_ste(x, "hardtanh") * _channel_mean_abs(x)
        k = x.detach().abs().reshape(x.shape[0], -1).mean(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
        return sign_ste(x, "hardtanh") * k


@register_quantizer("bireal")
class BiRealQuantizer(BinaryQuantizer):
    """Bi-Real Net (Liu et al., 2018): activations with the ApproxSign gradient; weights ``sign(W)·mean|W_c|``
    whose gradient flows through the magnitude as well (magnitude-aware). The model's residual additions
    stay real-valued, which is Bi-Real's shortcut wherever the model has one."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            scale = x.abs().reshape(x.shape[0], -1).mean(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
            return sign_ste(x, "identity") * scale  # the scale keeps its gradient: magnitude-aware
        return sign_ste(x, "approx")


@register_quantizer("irnet")
class IRNetQuantizer(BinaryQuantizer):
    """IR-Net (Qin et al., 2020). Weights: Libra-PB, i.e. each output channel standardised (zero mean, unit
    std) before ``sign``, scaled by the power of two nearest its mean magnitude. Backward for weights and
    activations: the error decay estimator with ``t`` growing log-linearly from 0.1 to 10 over training."""

    t_min, t_max = 0.1, 10.0

    def temperature(self) -> float:
        return self.t_min * 10 ** (self.progress * math.log10(self.t_max / self.t_min))

    def balanced(self, w: torch.Tensor) -> torch.Tensor:
        """Libra-PB: per output channel, zero mean and unit standard deviation."""
        rows = w.reshape(w.shape[0], -1)
        rows = (rows - rows.mean(dim=1, keepdim=True)) / rows.std(dim=1, keepdim=True).clamp_min(1e-8)
        return rows.reshape(w.shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature()
        if self.role == "activation":
            return sign_ste(x, "ede", t)
        wb = self.balanced(x)
        scale = torch.pow(2.0, torch.round(torch.log2(_channel_mean_abs(wb).clamp_min(1e-8))))
        return sign_ste(wb, "ede", t) * scale


@register_quantizer("rsign")
class RSignQuantizer(BinaryQuantizer):
    """ReActNet's RSign (Liu et al., 2020): ``sign(x − α_c)`` with a learned shift per input channel
    (ApproxSign gradient). Activations only; the channel count is set by the layer (``num_groups``)."""

    roles = ("activation",)
    per_input_channel = True

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.shift = nn.Parameter(torch.zeros(num_groups))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[1 if x.dim() > 1 else 0] = -1
        shift = self.shift.reshape(shape) if self.shift.numel() > 1 else self.shift
        return sign_ste(x - shift, "approx")


class RPReLU(OptionalStateModule):
    """ReActNet's RPReLU: ``PReLU(x − γ_c) + ζ_c`` with learned per-channel shifts, after a binary layer."""

    added_by_quantization = True  # checkpoints keep its state with the quantizers'

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.zeta = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), 0.25))  # PReLU's negative slope, as nn.PReLU's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[1 if x.dim() > 1 else 0] = -1
        return F.prelu(x - self.gamma.reshape(shape), self.slope) + self.zeta.reshape(shape)


def apply_rprelu(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook that puts a layer's output through its ``rprelu`` (ReActNet); exporters carry it by name."""
    return cast(RPReLU, module.rprelu)(output)


@register_quantizer("sketch")
class SketchQuantizer(BinaryQuantizer):
    """Network Sketching (Guo et al., 2017): each filter ``W_c ≈ Σ_j α_j·B_j`` with ``m`` binary bases.

    Greedy: ``B_j = sign(R_{j−1})``, ``α_j = mean|R_{j−1}|`` on the residual; refined: after each new basis all
    ``α`` of the filter are re-solved by least squares. ``m = cfg.bits`` (the recipe's weight bits); the
    gradient reaches the latent weight straight through. Weights only."""

    roles = ("weight",)

    @property
    def bases(self) -> int:
        return self.bits

    def decompose(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sketch of ``w`` as scales ``(C, m)`` and ±1 bases ``(C, m, K)``, one row per output channel."""
        rows = w.detach().reshape(w.shape[0], -1)
        residual = rows
        basis: list[torch.Tensor] = []
        alpha = rows.new_zeros(rows.shape[0], 0)
        for _ in range(self.bases):
            basis.append(torch.where(residual >= 0, 1.0, -1.0))
            b = torch.stack(basis, dim=1)  # (C, j, K)
            gram = b @ b.transpose(1, 2)  # (C, j, j)
            rhs = (b @ rows.unsqueeze(2)).squeeze(2)  # (C, j)
            alpha = torch.linalg.solve(gram + 1e-6 * torch.eye(len(basis), device=w.device), rhs)
            residual = rows - compose_bases(alpha, b)
        return alpha.contiguous(), torch.stack(basis, dim=1)

    def sketch(self, w: torch.Tensor) -> torch.Tensor:
        return compose_bases(*self.decompose(w)).reshape(w.shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.sketch(x) + (x - x.detach())  # forward: exactly the sketch; gradient: straight through

    @property
    def bits_per_weight(self) -> int:  # type: ignore[override]
        return self.bases


class TernaryQuantizer(BinaryQuantizer):
    """Base for ternary weights: each output channel is ``{−neg_c, 0, pos_c}``, stored as codes {−1, 0, 1}."""

    roles = ("weight",)
    bits_per_weight = 2

    def ternary(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes {−1, 0, 1} (int8, ``w``'s shape) and the positive and negative scales per output channel."""
        raise NotImplementedError

    def export_grid(self) -> ExportGrid:
        """No static grid: the scales come from the weight itself (export takes codes and scales from ``ternary``)."""
        return NoIntegerGrid(
            f"{type(self).__name__} is ternary: its scales come from the weight ({type(self).__name__}.ternary), "
            "which export reads for a layer's weight only; or export it with format='packed'"
        )


@register_quantizer("twn")
class TWNQuantizer(TernaryQuantizer):
    """Ternary Weight Networks (Li et al., 2016): ``α·sign(W)·1[|W| > Δ]`` with ``Δ = 0.7·mean|W|`` and ``α``
    the mean ``|W|`` above ``Δ`` (per layer); straight-through gradient. Weights only. The forward weight is
    exactly ``{−α, 0, α}``: the straight-through term ``x − x`` adds an exact zero."""

    def _codes_alpha(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.detach()
        delta = 0.7 * w.abs().mean()
        keep = w.abs() > delta
        alpha = w.abs()[keep].mean() if bool(keep.any()) else w.abs().mean()
        return torch.sign(w) * keep, alpha

    def ternary(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, alpha = self._codes_alpha(w)
        scale = alpha.reshape(1).expand(w.shape[0]).clone()
        return codes.to(torch.int8), scale, scale.clone()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        codes, alpha = self._codes_alpha(x)
        return alpha * codes + (x - x.detach())


@register_quantizer("ttq")
class TTQQuantizer(TernaryQuantizer):
    """Trained Ternary Quantization (Zhu et al., 2017): ``W_p`` above ``Δ = 0.05·max|w|``, ``−W_n`` below
    ``−Δ``, 0 between, on the latent weights normalised to [−1, 1]. ``W_p``/``W_n`` are learned (init 1):
    each gets the summed gradient of its region; the latent weight gets the gradient scaled by ``W_p``, 1
    or ``W_n`` by region. Weights only."""

    def __init__(self, cfg: QuantizerConfig, role: Role, num_groups: int = 1) -> None:
        super().__init__(cfg, role, num_groups)
        self.w_pos = nn.Parameter(torch.ones(()))
        self.w_neg = nn.Parameter(torch.ones(()))

    def _regions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = x / x.detach().abs().max().clamp_min(1e-8)
        delta = 0.05  # of max|w|, after normalisation
        return w, (w.detach() > delta).to(x.dtype), (w.detach() < -delta).to(x.dtype)

    def ternary(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, pos, neg = self._regions(w.detach())
        channels = w.shape[0]
        pos_scale = self.w_pos.detach().reshape(1).expand(channels).clone()
        return (pos - neg).to(torch.int8), pos_scale, self.w_neg.detach().reshape(1).expand(channels).clone()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        w, pos, neg = self._regions(x)
        values = self.w_pos * pos - self.w_neg * neg
        latent_scale = self.w_pos.detach() * pos + self.w_neg.detach() * neg + (1 - pos - neg)
        surrogate = latent_scale * w
        return values + (surrogate - surrogate.detach())  # forward: exactly the three values


def compose_bases(alpha: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """``Σ_j alpha[:, j]·bases[:, j]``: rows ``(C, K)`` from scales ``(C, m)`` and ±1 bases ``(C, m, K)``.

    The packed format calls this same function, so that its weights equal the trained ones to the bit."""
    return (alpha.contiguous().unsqueeze(2) * bases.contiguous()).sum(dim=1)


def ternary_weight(codes: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Weights from float codes {−1, 0, 1} ``(C, K)`` and per-channel scales ``(C,)``: ``pos`` or ``−neg``, exactly."""
    return codes * torch.where(codes > 0, pos.reshape(-1, 1), neg.reshape(-1, 1))
