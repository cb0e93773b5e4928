"""The reconstruction loop shared by AdaRound, BRECQ and QDrop, and the calibration pass before it.

Each unit (layer or block, see :mod:`units`) is optimised in turn so that its quantized output matches
the float model's output on the calibration set, taking as input what the already-quantized model before
it produces. What differs between methods is the unit size, whether activation steps are learned, and
QDrop's random dropping of quantization; those are the arguments of :func:`reconstruct`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.ptq.capture import RunBatch, UnitSignatureError, capture
from lightning_quant.ptq.progress import Progress, ProgressReport
from lightning_quant.ptq.settings import PTQConfig
from lightning_quant.ptq.units import Unit, find_units
from lightning_quant.quantizers import ObserverQuantizer
from lightning_quant.quantizers.adaround import AdaRound
from lightning_quant.quantizers.attachment import ReconstructionState
from lightning_quant.quantizers.modes import quant_state, quantizers_of, set_modes, set_quant_state
from lightning_quant.registry import OptionError

__all__ = [  # Progress, ProgressReport and set_quant_state are imported from here by the algorithm files
    "ActivationStepOptions",
    "Progress",
    "ProgressReport",
    "ReconstructionOptions",
    "calibrate",
    "eval_then_quantized",
    "finalize",
    "reconstruct",
    "set_quant_state",
    "split_units",
]


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


@contextlib.contextmanager
def eval_then_quantized(model: nn.Module) -> Iterator[None]:
    """Run an algorithm with ``model`` in eval mode; afterwards every quantizer is on and the mode restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        set_modes(model, fake_quant=True)
        model.train(was_training)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[Any], run_batch: RunBatch) -> None:
    """Set every quantizer's range from the calibration batches, with the model running in float.

    Weights are observed once, activations on every batch; then each observer settles its final
    range (KL search, for instance). Quantization and observation are left off; the caller switches
    quantization on.
    """
    quantizers = set_modes(model, fake_quant=False, observe=False, calibrate=False)  # the state it leaves
    for q in quantizers:
        observer = getattr(q, "observer", None)
        if q.role == "activation" and observer is not None and hasattr(observer, "deferred"):
            observer.deferred = True  # search once over all batches (MSE) instead of once per batch
    with quant_state(quantizers, observe=True, calibrate=True):
        for batch in batches:
            run_batch(batch)


def finalize(model: nn.Module) -> None:
    """End of calibration on every quantizer (after any DDP synchronisation of the statistics)."""
    for q in quantizers_of(model):
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


@dataclass(frozen=True)
class Plan:
    """What one :func:`reconstruct` call learns, the same for each unit (see its arguments)."""

    stage: str
    learn_weights: bool
    learn_activations: bool
    activations_on: bool
    drop_prob: float
    act_lr: float
    iters: int


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
    if act_lr is None and isinstance(opts, ActivationStepOptions):
        act_lr = opts.act_lr
    if learn_activations and act_lr is None:
        raise ValueError(f"ptq.algorithm={cfg.algorithm!r}: learning activation steps needs act_lr")
    plan = Plan(
        stage,
        learn_weights,
        learn_activations,
        activations_on,
        drop_prob,
        0.0 if act_lr is None else act_lr,
        opts.iters if iters is None else iters,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    curves: dict[str, list[float]] = {}
    pending = find_units(model, blocks)
    index = 0
    with eval_then_quantized(model):
        while pending:
            unit = pending.pop(0)
            report = partial(ProgressReport, stage, unit.name, index, index + 1 + len(pending))
            try:
                data = UnitData.capture(model, unit, batches, run_batch, cfg, plan.activations_on)
            except UnitSignatureError:
                if len(unit.modules) == 1 and unit.layers() == unit.modules:
                    raise
                pending = split_units(model, unit) + pending
                continue
            curves[unit.name] = _reconstruct_unit(unit, data, plan, cfg, generator, report, progress)
            index += 1
    return curves


@dataclass
class UnitData:
    """A unit's inputs in the quantized model and in the float model, and the float unit's output (the target)."""

    q_in: torch.Tensor
    fp_in: torch.Tensor
    fp_out: torch.Tensor

    @classmethod
    def capture(
        cls, model: nn.Module, unit: Unit, batches: Sequence[Any], run_batch: RunBatch, cfg: PTQConfig, acts: bool
    ) -> UnitData:
        """Run the calibration batches twice: quantized (activations as ``acts`` says), then in float."""
        set_quant_state(model, weights=True, activations=acts)
        q_in, _ = capture(unit, batches, run_batch, outputs=False, limit_mb=cfg.cache_limit_mb)
        with quant_state(model, fake_quant=False):
            fp_in, fp_out = capture(unit, batches, run_batch, outputs=True, limit_mb=cfg.cache_limit_mb)
        assert fp_out is not None
        return cls(q_in, fp_in, fp_out)

    def sample(self, idx: torch.Tensor, drop_prob: float, generator: torch.Generator) -> torch.Tensor:
        """The quantized inputs ``idx``; with ``drop_prob`` each element is the float one with that probability."""
        x = self.q_in[idx].to(self.fp_out.device)
        if drop_prob > 0:
            keep_float = torch.rand(x.shape, generator=generator) < drop_prob
            x = torch.where(keep_float.to(x.device), self.fp_in[idx].to(x.device), x)
        return x


class UnitTraining:
    """What a unit learns (AdaRound rounding, activation steps), attached to its quantizers, and the optimisers.

    Attaching gives each learning quantizer a :class:`ReconstructionState`; :meth:`release` hardens the
    rounding into fixed codes, writes the learned steps back and removes every attachment.
    """

    def __init__(self, unit: Unit, plan: Plan, cfg: PTQConfig) -> None:
        self.roundings: list[tuple[ObserverQuantizer, AdaRound]] = []
        if plan.learn_weights:
            for layer, q in unit.weight_quantizers():
                if q.fake_quant_enabled:
                    state = ReconstructionState()
                    state.rounding = AdaRound(q, layer.weight_to_quantize()).to(q.scale.device)
                    q.reconstruction = state
                    self.roundings.append((q, state.rounding))
        acts = [q for q in unit.activation_quantizers() if isinstance(q, ObserverQuantizer) and plan.activations_on]
        self.activations: list[ObserverQuantizer] = acts
        for q in acts:
            state = ReconstructionState(plan.drop_prob)
            if plan.learn_activations:
                state.step = nn.Parameter(q.scale.detach().clone())
            q.reconstruction = state
            q.train()  # dropping is active in training mode only
        self.optimizers: list[torch.optim.Optimizer] = []
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        if self.roundings:
            self.optimizers.append(torch.optim.Adam([ada.alpha for _, ada in self.roundings], lr=cfg.options.weight_lr))
        steps = [s.step for q in acts if (s := q.reconstruction) is not None and s.step is not None]
        if steps:
            opt_a = torch.optim.Adam(steps, lr=plan.act_lr)
            self.optimizers.append(opt_a)
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=plan.iters, eta_min=0.0)

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's rounding regulariser summed over the unit's layers."""
        return sum(ada.regularizer(beta) for _, ada in self.roundings)  # type: ignore[return-value]

    def step(self, loss: torch.Tensor) -> None:
        """One optimisation step of everything the unit learns."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        if self.scheduler is not None:
            self.scheduler.step()

    @torch.no_grad()
    def release(self, harden: bool = True) -> None:
        """Remove the attachments; with ``harden`` the learned rounding and steps are kept in the quantizers."""
        for q, ada in self.roundings:
            if harden:
                q.set_codes(ada.hard_codes())
            q.reconstruction = None
        for q in self.activations:
            state, q.reconstruction = q.reconstruction, None
            q.eval()
            if harden and state is not None and state.step is not None:
                q.scale.copy_(state.step.detach().abs())


def _reconstruct_unit(
    unit: Unit,
    data: UnitData,
    plan: Plan,
    cfg: PTQConfig,
    generator: torch.Generator,
    report: partial[ProgressReport],
    progress: Optional[Progress],
) -> list[float]:
    """Train what ``plan`` says on one unit until its quantized output matches the float one; the loss curve."""
    training = UnitTraining(unit, plan, cfg)
    curve: list[float] = []
    try:
        if training.optimizers:
            curve = _train(unit, data, training, plan, cfg, generator, report, progress)
    except BaseException:
        training.release(harden=False)
        raise
    training.release()
    if not training.optimizers and progress is not None:
        progress(report(0, 0, math.nan))
    return curve


def _train(
    unit: Unit,
    data: UnitData,
    training: UnitTraining,
    plan: Plan,
    cfg: PTQConfig,
    generator: torch.Generator,
    report: partial[ProgressReport],
    progress: Optional[Progress],
) -> list[float]:
    """The optimisation loop: random minibatches of the cached inputs, the loss curve sampled ~100 times."""
    curve: list[float] = []
    n = data.q_in.shape[0]
    report_every = max(1, plan.iters // 100)
    for it in range(plan.iters):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=generator)
        x = data.sample(idx, plan.drop_prob, generator)
        loss = _loss(unit(x), data.fp_out[idx].to(x.device))
        beta = _beta(cfg.options, it, plan.iters)
        if beta is not None and training.roundings:
            loss = loss + cfg.options.reg_weight * training.regularizer(beta)
        training.step(loss)
        if it % report_every == 0 or it == plan.iters - 1:
            curve.append(float(loss.detach()))
            if progress is not None:
                progress(report(it + 1, plan.iters, curve[-1]))
    return curve
