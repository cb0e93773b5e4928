"""Binarizers on hand-checked tensors, and the Binarization callback in real Trainer runs."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_quant import Binarization, list_recipes, load_recipe
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier
from lightning_quant.nn import quantized_layers
from lightning_quant.quantizers import QuantizerConfig, build_quantizer
from lightning_quant.quantizers.binary import IRNetQuantizer, RPReLU, SketchQuantizer, sign_ste


def _q(method, role="weight", bits=1, groups=1):
    return build_quantizer(QuantizerConfig(method=method, bits=bits), role, groups)


def test_sign_estimators_forward_and_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.5], requires_grad=True)
    for kind, expected in [
        ("identity", [1.0, 1, 1, 1, 1]),
        ("hardtanh", [0.0, 1, 1, 1, 0]),
        ("approx", [0.0, 1.0, 2.0, 1.5, 0.0]),
    ]:
        x.grad = None
        y = sign_ste(x, kind)
        assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
        y.sum().backward()
        assert x.grad.tolist() == expected, kind
    x.grad = None
    sign_ste(x, "ede", 1.0).sum().backward()  # t = 1: k = 1, gradient 1 - tanh²(x)
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_bnn_and_binaryconnect_binarize_with_their_estimators():
    w = torch.tensor([[-1.5, -0.2, 0.3, 0.9]], requires_grad=True)
    out = _q("bnn")(w)
    assert out.tolist() == [[-1.0, -1.0, 1.0, 1.0]]
    out.sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0]]  # hard-tanh window
    w.grad = None
    _q("binaryconnect")(w).sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_xnor_weight_scale_is_the_per_channel_mean_absolute_weight():
    w = torch.tensor([[1.0, -3.0, 2.0, -2.0], [0.5, 0.5, -0.5, 0.5]]).reshape(2, 4, 1, 1)
    out = _q("xnor", groups=2)(w)
    torch.testing.assert_close(out.reshape(2, 4), torch.tensor([[2.0, -2.0, 2.0, -2.0], [0.5, 0.5, -0.5, 0.5]]))
    x = torch.tensor([[[[1.0, -3.0]]], [[[0.5, -0.5]]]])  # two samples: K = 2 and 0.5
    a = _q("xnor", role="activation")(x)
    torch.testing.assert_close(a.reshape(2, 2), torch.tensor([[2.0, -2.0], [0.5, -0.5]]))


def test_irnet_balances_weights_before_sign_and_anneals():
    torch.manual_seed(0)
    w = torch.randn(4, 8) * 0.1 + 0.3  # every channel has a strongly positive mean
    q = _q("irnet")
    assert isinstance(q, IRNetQuantizer)
    balanced = q.balanced(w)
    torch.testing.assert_close(balanced.mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(balanced.std(dim=1), torch.ones(4))
    out = q(w)
    signs = torch.sign(out)
    assert bool((signs > 0).any()) and bool((signs < 0).any())  # plain sign(w) would be all +1
    scales = out.abs().amax(dim=1)
    torch.testing.assert_close(torch.log2(scales), torch.log2(scales).round())  # powers of two
    q.progress = 0.0
    assert q.temperature() == pytest.approx(0.1)
    q.progress = 1.0
    assert q.temperature() == pytest.approx(10.0)


def test_sketch_refined_bases_approximate_better_with_more_bases():
    torch.manual_seed(0)
    w = torch.randn(6, 27)
    errors = []
    for m in (1, 2, 3):
        q = _q("sketch", bits=m)
        assert isinstance(q, SketchQuantizer)
        approx = q.sketch(w)
        errors.append(float((approx - w).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]
    one = _q("sketch", bits=1).sketch(w)  # m = 1: sign(W)·mean|W| per filter
    torch.testing.assert_close(one, torch.sign(w) * w.abs().mean(dim=1, keepdim=True))


def test_ternary_twn_and_ttq():
    w = torch.tensor([[0.05, -0.1, 1.0, -2.0, 0.5, -0.6]], requires_grad=True)
    twn = _q("twn", bits=2)(w)
    delta = 0.7 * w.detach().abs().mean()  # 0.7 * 4.25 / 6 = 0.4958: 1.0, -2.0, 0.5, -0.6 stay
    alpha = (1.0 + 2.0 + 0.5 + 0.6) / 4  # mean |w| of the kept weights
    torch.testing.assert_close(twn, torch.tensor([[0, 0, alpha, -alpha, alpha, -alpha]]))
    assert float(delta) == pytest.approx(0.4958, abs=1e-4)
    ttq = _q("ttq", bits=2)
    with torch.no_grad():
        ttq.w_pos.fill_(0.8)
        ttq.w_neg.fill_(1.2)
    out = ttq(w)
    # normalised by max|w| = 2: 0.025 and -0.05 fall within the 0.05 threshold
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.8, -1.2, 0.8, -1.2]]))
    out.sum().backward()
    assert ttq.w_pos.grad.item() == pytest.approx(2.0)  # gradient summed over the positive region
    assert ttq.w_neg.grad.item() == pytest.approx(-2.0)


def test_rsign_and_rprelu_learn_per_channel_shifts():
    q = _q("rsign", role="activation", groups=3)
    with torch.no_grad():
        q.shift.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.zeros(1, 3, 2, 2)
    assert q(x)[0, :, 0, 0].tolist() == [1.0, -1.0, 1.0]
    act = RPReLU(3)
    torch.testing.assert_close(act(torch.full((1, 3, 1, 1), -4.0)).flatten(), torch.full((3,), -1.0))


def _fit(recipe, epochs=1, **kw):
    pl.seed_everything(0)
    model = ImageClassifier(DigitsCNN(width=8), optimizer="adam", lr=5e-3, epochs=epochs)
    cb = Binarization(recipe, overrides=["diagnostics.summary=false"])
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=4,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        **kw,
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    return model, cb, trainer


@pytest.mark.parametrize("recipe", [name for name in list_recipes() if load_recipe(name).kind == "binary"])
def test_every_binary_recipe_trains_and_logs(recipe):
    model, cb, trainer = _fit(recipe, epochs=2)
    layer = model.net.features[3]
    w = layer.quantized_weight().detach()
    distinct = torch.unique(w.abs().reshape(w.shape[0], -1), dim=None).numel()
    assert distinct <= w.shape[0] * 2 ** load_recipe(recipe).weights.bits + 1
    metrics = cb.last_epoch_metrics
    assert 0.0 <= metrics["binary/sign_flip_rate"] <= 1.0
    assert metrics["binary/compression"] > 3.0
    if load_recipe(recipe).activations.enabled:
        assert metrics["binary/fraction_binary_ops"] > 0.5
        assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())  # sign(ReLU(x)) would be constant
    else:
        assert any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    if recipe in ("bnn", "binaryconnect"):
        assert float(layer.weight.abs().max()) <= 1.0  # latent weights clipped
    if recipe == "reactnet":
        assert isinstance(layer.rprelu, RPReLU)
        trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        assert id(layer.rprelu.gamma) in trained  # inserted in setup, before configure_optimizers
        assert id(layer.input_quantizer.shift) in trained
    if recipe == "irnet":
        assert layer.weight_quantizer.progress > 0.7


def test_binary_checkpoint_resume_restores_state(tmp_path):
    model, cb, trainer = _fit("reactnet", epochs=1)
    ckpt = tmp_path / "bin.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert any("rprelu" in k for k in state["lightning_quant"]["quantizer_state"])
    plain = ImageClassifier.load_from_checkpoint(ckpt, net=DigitsCNN(width=8))  # float keys only: strict load
    assert not hasattr(plain.net.features[3], "rprelu")
    fresh = ImageClassifier(DigitsCNN(width=8))
    cb2 = Binarization("reactnet", overrides=["diagnostics.summary=false"])
    trainer2 = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb2])
    trainer2.validate(fresh, datamodule=DigitsDataModule(), ckpt_path=ckpt, verbose=False)
    torch.testing.assert_close(fresh.net.features[3].rprelu.gamma, model.net.features[3].rprelu.gamma)
    torch.testing.assert_close(fresh.net.features[3].input_quantizer.shift, model.net.features[3].input_quantizer.shift)


def test_binarization_refuses_other_kinds():
    with pytest.raises(MisconfigurationException, match="kind='qat' is not allowed for Binarization"):
        Binarization("lsq_w4a4")


class _FunctionalReluNet(torch.nn.Module):
    """Conv-BN stages with ``F.relu`` in ``forward``: the callback cannot see or remove those ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv3, self.bn3 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))  # no ReLU before the last layer: its (float) input may be negative
        return self.fc(x.mean(dim=(2, 3)))


def _fit_net(recipe, net):
    pl.seed_everything(0)
    model = ImageClassifier(net, optimizer="adam", lr=5e-3, epochs=1)
    cb = Binarization(recipe, overrides=["diagnostics.summary=false"])
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=DigitsDataModule())
    return model, [str(w.message) for w in caught if "sign() is +1 everywhere" in str(w.message)]


def test_functional_relu_before_a_binary_activation_is_reported_by_layer():
    model, warned = _fit_net("bnn", _FunctionalReluNet())
    assert len(warned) == 1
    assert "'net.conv2'" in warned[0] and "'net.conv3'" in warned[0]  # both follow an F.relu
    assert "F.relu" in warned[0] and "nn.ReLU" in warned[0]  # says what to do
    name, layer = quantized_layers(model)[0]
    assert name == "net.conv2" and not layer.input_quantizer._forward_pre_hooks  # the watch left no hook behind


def test_relu_modules_give_no_constant_sign_warning():
    _, warned = _fit_net("bnn", DigitsCNN(width=8))
    assert warned == []
