"""LSQ's activation grid after GELU/SiLU, LSQ steps that stay positive, and PACT's data-driven clip."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from torch import nn

from lightning_quant import QuantizationAwareTraining, export
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier
from lightning_quant.quantizers import LSQQuantizer, PACTQuantizer, QuantizerConfig

QUICK = ["diagnostics.summary=false", "diagnostics.every_n_steps=0"]


def digits_cnn(act: type[nn.Module] = nn.ReLU, width: int = 16) -> DigitsCNN:
    """The digits CNN with its ReLUs replaced by ``act`` (conv-BN-act stages)."""
    net = DigitsCNN(width=width)
    for i, m in enumerate(net.features):
        if isinstance(m, nn.ReLU):
            net.features[i] = act()
    return net


def digits_batch(n: int = 256) -> torch.Tensor:
    dm = DigitsDataModule(shuffle=False)
    dm.setup("fit")
    return dm.train_set.tensors[0][:n]


def middle_conv_input(act: type[nn.Module]) -> torch.Tensor:
    """The input of the middle conv of a conv-BN-``act`` net on digits (BN in training mode, as in QAT)."""
    torch.manual_seed(0)
    net = digits_cnn(act)
    with torch.no_grad():
        return net.features[:3](digits_batch())


def levels_used(q: LSQQuantizer, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(torch.unique(q(x)).numel())


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU])
@pytest.mark.parametrize(("bits", "need"), [(2, 3), (4, 13)])
def test_lsq_activation_grid_uses_its_levels_after_gelu_and_silu(act, bits, need):
    x = middle_conv_input(act)
    assert x.min() < 0  # GELU/SiLU outputs have a small negative part
    q = LSQQuantizer(QuantizerConfig(method="lsq", bits=bits), "activation")
    assert levels_used(q, x) >= need  # the old "signed if any negative" rule used 2 of 4 and 8-9 of 16
    assert q.qmin >= -1  # at most one negative level for a negative part of -0.17 / -0.28


def test_lsq_activation_grid_stays_unsigned_after_relu_and_signed_for_zero_mean_inputs():
    relu = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), "activation")
    relu(middle_conv_input(nn.ReLU))
    assert (relu.qmin, relu.qmax, bool(relu.signed)) == (0, 15, False)
    torch.manual_seed(0)
    pre_activation = digits_cnn().features[:2](digits_batch()).detach()  # conv-BN output: zero mean per channel
    signed = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), "activation")
    out = signed(pre_activation)
    assert signed.qmin <= -7 and signed.qmax >= 7  # a balanced grid (z = 7 or 8 of 16 levels below zero)
    assert out.min() < -1 and out.max() > 1
    fixed = LSQQuantizer(QuantizerConfig(method="lsq", bits=4, signed=True), "activation")
    fixed(middle_conv_input(nn.GELU))
    assert (fixed.qmin, fixed.qmax) == (-8, 7)  # an explicit recipe choice is kept


def test_lsq_shifted_grid_survives_a_state_dict_round_trip_and_old_state_loads():
    q = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), "activation")
    x = middle_conv_input(nn.SiLU)
    ref = q(x)
    assert q.qmin == -int(q.zero_point) < 0
    fresh = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), "activation")
    fresh.load_state_dict(q.state_dict())
    assert (fresh.qmin, fresh.qmax) == (q.qmin, q.qmax)
    assert torch.equal(fresh(x), ref)
    old = {k: v for k, v in q.state_dict().items() if k != "zero_point"}  # written before shifted grids existed
    fresh.load_state_dict(old)
    assert (fresh.qmin, fresh.qmax) == (0, 15)


def test_lsq_w2a2_on_a_gelu_net_feeds_the_middle_conv_three_or_more_levels():
    pl.seed_everything(0)
    model = ImageClassifier(digits_cnn(nn.GELU), epochs=1)
    cb = QuantizationAwareTraining("lsq_w2a2", overrides=QUICK)
    quiet_trainer([cb], max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(
        model, datamodule=DigitsDataModule()
    )
    seen = []
    q = model.net.features[3].input_quantizer
    handle = q.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    model.eval()
    with torch.no_grad():
        model(digits_batch())
    handle.remove()
    assert torch.unique(seen[0]).numel() >= 3


def test_lsq_w8a8_on_a_gelu_net_exports_its_shifted_grids(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pl.seed_everything(0)
    model = ImageClassifier(digits_cnn(nn.GELU), epochs=1)
    cb = QuantizationAwareTraining("lsq_w8a8", overrides=QUICK)
    quiet_trainer([cb], max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(
        model, datamodule=DigitsDataModule()
    )
    q = model.net.features[3].input_quantizer
    assert 0 < int(q.zero_point) < 128  # GELU's input to the middle conv: a uint8 grid with a zero point
    x = digits_batch(64)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    path = export(model, x[:1], tmp_path / "gelu.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.98
    assert ((got - ref).abs() < 1e-3).float().mean() >= 0.95


class ScratchNet(nn.Module):
    """A user's plain CNN without BatchNorm, trained from scratch (the model of issue 14's collapse)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_lsq_w4a4_from_scratch_with_adam_lr_1e2_keeps_positive_steps_and_learns():
    pl.seed_everything(0)
    model = ImageClassifier(ScratchNet(), optimizer="adam", lr=1e-2, epochs=2)
    cb = QuantizationAwareTraining("lsq_w4a4", overrides=QUICK)
    dm = DigitsDataModule()
    trainer = quiet_trainer([cb], max_epochs=2, limit_train_batches=17, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    steps = {n: m.scale_values() for n, m in model.named_modules() if isinstance(m, LSQQuantizer)}
    assert steps and all(bool((s > 0).all()) for s in steps.values()), steps
    # the raw fc input step went to -0.016 before, zeroing the ReLU input: 9.4% accuracy
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"] > 0.8


def test_lsq_step_keeps_value_and_gradient_when_positive_and_stays_positive_when_not():
    x = middle_conv_input(nn.ReLU)
    q = LSQQuantizer(QuantizerConfig(method="lsq", bits=4, signed=False), "activation")
    q(x)
    with torch.no_grad():
        q.scale.fill_(0.25)
    ref = torch.clamp(torch.round(x / 0.25), 0, 15) * 0.25
    out = q(x)
    assert torch.equal(out, ref)
    out.sum().backward()
    grad = q.scale.grad.clone()
    with torch.no_grad():
        q.scale.fill_(-0.25)  # what an optimizer step can do to the raw parameter
    q.scale.grad = None
    out = q(x)
    assert torch.equal(out, ref)  # before: every code clamped to 0, and no gradient to recover with
    out.sum().backward()
    assert torch.equal(q.scale.grad, -grad)


def test_pact_refuses_one_bit():
    with pytest.raises(ValueError, match="PACT needs at least 2 activation bits, got bits=1"):
        PACTQuantizer(QuantizerConfig(method="pact", bits=1), "activation")


@pytest.mark.parametrize("bits", [2, 4])
def test_pact_clip_starts_inside_the_first_batch_range(bits):
    x = middle_conv_input(nn.ReLU)
    q = PACTQuantizer(QuantizerConfig(method="pact", bits=bits), "activation")
    out = q(x)
    alpha = float(q.alpha.detach())
    assert 0 < alpha < float(x.max())
    assert torch.isfinite(out).all()
    assert torch.unique(out).numel() == 2**bits  # every level in use from the first step
    explicit = PACTQuantizer(QuantizerConfig(method="pact", bits=bits, clip_init=10.0), "activation")
    explicit(x)
    assert float(explicit.alpha) == 10.0  # a recipe's clip_init still wins


def _fine_tune(base: ImageClassifier, overrides: list[str]) -> float:
    model = copy.deepcopy(base)
    model.hparams.update(optimizer="sgd", lr=0.01, epochs=2)
    pl.seed_everything(0)
    dm = DigitsDataModule()
    cb = QuantizationAwareTraining("pact_w4a4", overrides=[*QUICK, "weights.bits=2", "activations.bits=2", *overrides])
    trainer = quiet_trainer([cb], max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    return trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]


def test_pact_w2a2_fine_tuning_beats_the_fixed_clip_init(float_model):
    data_init = _fine_tune(float_model, [])
    fixed_init = _fine_tune(float_model, ["activations.clip_init=10"])
    assert data_init > fixed_init + 0.05, (data_init, fixed_init)
