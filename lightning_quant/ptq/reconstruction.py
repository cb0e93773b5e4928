"""The reconstruction loop shared by AdaRound, BRECQ and QDrop, and the calibration pass before it.

Each unit (layer or block, see :mod:`units`) is optimised in turn so that its quantized output matches
the float model's output on the calibration set, taking as input what the already-quantized model before
it produces. What differs between methods is the unit size, whether activation steps are learned, and
QDrop's random dropping of quantization; those are the arguments of :func:`reconstruct`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.ptq.capture import RunBatch, UnitSignatureError, capture
from lightning_quant.ptq.settings import PTQConfig
from lightning_quant.ptq.units import Unit, find_units
from lightning_quant.quantizers import ObserverQuantizer, Quantizer
from lightning_quant.quantizers.adaround import AdaRound
from lightning_quant.registry import OptionError


@dataclass
class ReconstructionOptions:
    """AdaRound's keys of the ``ptq`` section, shared by BRECQ and QDrop. Iteration counts default to the papers'."""

    iters: int = 20000  # reconstruction iterations per unit (lower it for quick runs)
    weight_lr: float = 1e-3  # Adam, AdaRound's rounding variables
    reg_weight: float = 0.01  # lambda of the rounding regulariser
    warmup: float = 0.2  # fraction of iterations without the regulariser
    beta_start: float = 20.0  # regulariser exponent, annealed linearly after warm-up ...
    beta_end: float = 2.0  # ... down to this

    def check(self) -> None:
        if not self.iters >= 0:
            raise OptionError("iters", self.iters, "must be >= 0")
        for key in ("weight_lr", "beta_start", "beta_end"):
            if not getattr(self, key) > 0:
                raise OptionError(key, getattr(self, key), "must be positive")
        if not self.reg_weight >= 0:
            raise OptionError("reg_weight", self.reg_weight, "must be >= 0")
        if not 0 <= self.warmup < 1:
            raise OptionError("warmup", self.warmup, "allowed: 0 <= warmup < 1")


@dataclass
class ActivationStepOptions(ReconstructionOptions):
    """Reconstruction that also learns the activation steps (BRECQ's second stage, QDrop)."""

    act_lr: float = 4e-5  # Adam with cosine decay, activation steps (BRECQ 4e-4, QDrop 4e-5)

    def check(self) -> None:
        super().check()
        if not self.act_lr > 0:
            raise OptionError("act_lr", self.act_lr, "must be positive")


@dataclass
class Step:
    """One progress report: ``stage`` ('weights', 'activations', 'joint', 'bitsplit'), unit i of n, iteration."""

    stage: str
    unit: str
    index: int
    total: int
    iteration: int
    iterations: int
    loss: float


Progress = Callable[[Step], None]


def _quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def set_quant_state(model: nn.Module, weights: bool, activations: bool) -> None:
    """Switch fake quantization of every weight quantizer and every activation (input or output) quantizer."""
    for q in _quantizers(model):
        q.fake_quant_enabled = weights if q.role == "weight" else activations


@contextlib.contextmanager
def eval_then_quantized(model: nn.Module) -> Iterator[None]:
    """Run an algorithm with ``model`` in eval mode; afterwards every quantizer is on and the mode restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        set_quant_state(model, weights=True, activations=True)
        model.train(was_training)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[Any], run_batch: RunBatch) -> None:
    """Set every quantizer's range from the calibration batches, with the model running in float.

    Weights are observed once, activations on every batch; then each observer settles its final
    range (KL search, for instance). Quantization is left off; the caller switches it on.
    """
    quantizers = _quantizers(model)
    for q in quantizers:
        q.fake_quant_enabled = False
        q.calibrating = True
        q.observer_enabled = True
        observer = getattr(q, "observer", None)
        if q.role == "activation" and hasattr(observer, "deferred"):
            observer.deferred = True  # search once over all batches (MSE) instead of once per batch
    try:
        for batch in batches:
            run_batch(batch)
    finally:
        for q in quantizers:
            q.calibrating = False
            q.observer_enabled = False


def finalize(model: nn.Module) -> None:
    """End of calibration on every quantizer (after any DDP synchronisation of the statistics)."""
    for q in _quantizers(model):
        if isinstance(q, ObserverQuantizer):
            q.finalize_calibration()


def _beta(cfg: ReconstructionOptions, it: int, iters: int) -> Optional[float]:
    """Regulariser exponent at iteration ``it``; None during warm-up (regulariser off)."""
    start = cfg.warmup * iters
    if it < start:
        return None
    rel = (it - start) / max(1.0, iters - start)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over each sample's elements, averaged over the batch (as the papers' code)."""
    return (out - target).pow(2).reshape(out.shape[0], -1).sum(dim=1).mean()


def split_units(model: nn.Module, unit: Unit) -> list[Unit]:
    """A block that cannot be replayed alone, as layer-wise units of its modules."""
    names = {id(m): n for n, m in model.named_modules()}
    found: list[Unit] = []
    for m in unit.modules:
        for sub in find_units(m, blocks=False):
            prefix = names.get(id(m), unit.name)
            found.append(Unit(f"{prefix}.{sub.name}" if sub.name else prefix, sub.modules))
    return found


def reconstruct(
    model: nn.Module,
    batches: Sequence[Any],
    run_batch: RunBatch,
    cfg: PTQConfig,
    *,
    stage: str,
    blocks: bool,
    learn_weights: bool,
    learn_activations: bool,
    activations_on: bool,
    drop_prob: float = 0.0,
    act_lr: Optional[float] = None,
    iters: Optional[int] = None,
    progress: Optional[Progress] = None,
) -> dict[str, list[float]]:
    """Reconstruct every unit of ``model`` in order; returns each unit's loss curve.

    ``learn_weights``: AdaRound rounding is learned, then hardened into the weight quantizers' codes.
    ``learn_activations``: the units' input quantizers learn their steps (LSQ gradient, Adam, cosine).
    ``activations_on``: activation quantization inside the model (off for BRECQ's weight stage).
    ``drop_prob`` > 0 (QDrop): each activation element of the unit input and of its quantizers stays
    float with this probability while the unit trains; the target is always the float output.
    """
    opts: ReconstructionOptions = cfg.options
    iters = opts.iters if iters is None else iters
    if act_lr is None and isinstance(opts, ActivationStepOptions):
        act_lr = opts.act_lr
    if learn_activations and act_lr is None:
        raise ValueError(f"ptq.algorithm={cfg.algorithm!r}: learning activation steps needs act_lr")
    generator = torch.Generator().manual_seed(cfg.seed)
    curves: dict[str, list[float]] = {}
    pending = find_units(model, blocks)
    index = 0
    with eval_then_quantized(model):
        while pending:
            unit = pending.pop(0)
            try:
                curves[unit.name] = _reconstruct_unit(
                    model,
                    unit,
                    batches,
                    run_batch,
                    cfg,
                    stage=stage,
                    index=index,
                    total=index + 1 + len(pending),
                    learn_weights=learn_weights,
                    learn_activations=learn_activations,
                    activations_on=activations_on,
                    drop_prob=drop_prob,
                    act_lr=0.0 if act_lr is None else act_lr,
                    iters=iters,
                    generator=generator,
                    progress=progress,
                )
                index += 1
            except UnitSignatureError:
                if len(unit.modules) == 1 and unit.layers() == unit.modules:
                    raise
                pending = split_units(model, unit) + pending
    return curves


def _reconstruct_unit(
    model: nn.Module,
    unit: Unit,
    batches: Sequence[Any],
    run_batch: RunBatch,
    cfg: PTQConfig,
    *,
    stage: str,
    index: int,
    total: int,
    learn_weights: bool,
    learn_activations: bool,
    activations_on: bool,
    drop_prob: float,
    act_lr: float,
    iters: int,
    generator: torch.Generator,
    progress: Optional[Progress],
) -> list[float]:
    set_quant_state(model, weights=True, activations=activations_on)
    q_in, _ = capture(unit, batches, run_batch, outputs=False, limit_mb=cfg.cache_limit_mb)
    set_quant_state(model, weights=False, activations=False)
    fp_in, fp_out = capture(unit, batches, run_batch, outputs=True, limit_mb=cfg.cache_limit_mb)
    assert fp_out is not None
    set_quant_state(model, weights=True, activations=activations_on)

    rounding: list[tuple[ObserverQuantizer, AdaRound]] = []
    if learn_weights:
        for layer, q in unit.weight_quantizers():
            if q.fake_quant_enabled:
                ada = AdaRound(q, layer.weight_to_quantize()).to(q.scale.device)
                q.rounding = ada
                rounding.append((q, ada))
    act_quantizers = [q for q in unit.activation_quantizers() if isinstance(q, ObserverQuantizer) and activations_on]
    for q in act_quantizers:
        q.drop_prob = drop_prob
        q.train()  # dropping is active in training mode only
        if learn_activations:
            q.learn_scale(True)
    params_w = [ada.alpha for _, ada in rounding]
    params_a = [q.scale for q in act_quantizers if learn_activations]
    optimizers: list[torch.optim.Optimizer] = []
    scheduler = None
    if params_w:
        optimizers.append(torch.optim.Adam(params_w, lr=cfg.options.weight_lr))
    if params_a:
        opt_a = torch.optim.Adam(params_a, lr=act_lr)
        optimizers.append(opt_a)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=iters, eta_min=0.0)

    curve: list[float] = []
    n = q_in.shape[0]
    report_every = max(1, iters // 100)
    if optimizers:
        for it in range(iters):
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=generator)
            x = q_in[idx].to(fp_out.device)
            if drop_prob > 0:
                keep_float = torch.rand(x.shape, generator=generator) < drop_prob
                x = torch.where(keep_float.to(x.device), fp_in[idx].to(x.device), x)
            target = fp_out[idx].to(x.device)
            loss = _loss(unit(x), target)
            beta = _beta(cfg.options, it, iters)
            if beta is not None and rounding:
                loss = loss + cfg.options.reg_weight * sum(ada.regularizer(beta) for _, ada in rounding)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            if scheduler is not None:
                scheduler.step()
            if it % report_every == 0 or it == iters - 1:
                curve.append(float(loss.detach()))
                if progress is not None:
                    progress(Step(stage, unit.name, index, total, it + 1, iters, curve[-1]))
    with torch.no_grad():
        for q, ada in rounding:
            q.set_codes(ada.hard_codes())
            q.rounding = None
        for q in act_quantizers:
            q.drop_prob = 0.0
            q.eval()
            if learn_activations:
                q.learn_scale(False)
                q.scale.abs_()
    if not optimizers and progress is not None:
        progress(Step(stage, unit.name, index, total, 0, 0, math.nan))
    del q_in, fp_in, fp_out
    return curve
