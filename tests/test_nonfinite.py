"""A NaN or Inf input never poisons quantizer state: each quantizer raises NonFiniteInputError, naming itself
(``conv1.input_quantizer``), before it changes anything, on the fused C++ paths and on the Python ones."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from torch import nn

from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining, quantize_model
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier
from lightning_quant.quantizers import QuantizerConfig
from lightning_quant.quantizers._kernels import build
from lightning_quant.quantizers.finite import NonFiniteInputError

FAMILIES = {  # (weights, activations) per quantizer family
    "minmax": ({"method": "observer"}, {"method": "observer"}),
    "minmax-per-channel": ({"method": "observer", "granularity": "per_channel"}, {"method": "observer"}),
    "ema-asymmetric": ({"method": "observer"}, {"method": "observer", "observer": "ema", "symmetric": False}),
    "percentile": ({"method": "observer", "observer": "percentile"}, {"method": "observer", "observer": "percentile"}),
    "mse": ({"method": "observer", "observer": "mse"}, {"method": "observer", "observer": "mse"}),
    "kl": ({"method": "observer"}, {"method": "observer", "observer": "kl"}),
    "lsq": ({"method": "lsq", "granularity": "per_channel"}, {"method": "lsq"}),
    "lsq+": ({"method": "lsq"}, {"method": "lsq", "learn_offset": True}),
    "pact": ({"method": "lsq"}, {"method": "pact"}),
    "dsq": ({"method": "dsq"}, {"method": "dsq"}),
    "dorefa": ({"method": "dorefa"}, {"method": "dorefa"}),
    "rsign": ({"method": "xnor"}, {"method": "rsign"}),
}


@pytest.fixture(autouse=True, params=["fused", "python"])
def backend(request):
    build.set_enabled(request.param == "fused")
    yield request.param
    build.set_enabled(True)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv1(x)).flatten(1))


def _model(family: str) -> Net:
    torch.manual_seed(0)
    w, a = FAMILIES[family]
    net = Net()
    quantize_model(net, QuantizerConfig(bits=4, **w), QuantizerConfig(bits=4, **a))
    return net.train()


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_same_and_finite(before: dict[str, torch.Tensor], net: nn.Module) -> None:
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"
        if v.is_floating_point() and "observer.min_val" not in k and "observer.max_val" not in k:
            assert torch.isfinite(v).all(), k
    for k, v in after.items():
        if "observer" in k and ("min_val" in k or "max_val" in k) and bool(after[k.rsplit(".", 2)[0] + ".initialized"]):
            assert torch.isfinite(v).all(), k  # an observed range is never NaN or Inf


def _bad(value: float) -> torch.Tensor:
    x = torch.randn(4, 3, 8, 8)
    x[1, 2, 3, 4] = value
    return x


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_first_batch_non_finite_raises_and_changes_nothing(family, value):
    net = _model(family)
    before = _state(net)
    with pytest.raises(NonFiniteInputError, match=r"conv1\.input_quantizer"):
        net(_bad(value))
    _assert_same_and_finite(before, net)
    net(torch.randn(4, 3, 8, 8)).sum().backward()  # a clean batch then initialises as usual
    assert net.conv1.input_quantizer._initialized


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "dorefa"])  # DoReFa holds no state to protect
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_later_batch_non_finite_raises_and_changes_nothing(family, value):
    net = _model(family)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(2):
        net(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    before = _state(net)
    with pytest.raises(NonFiniteInputError, match=r"conv1\.input_quantizer"):
        net(_bad(value))
    _assert_same_and_finite(before, net)


def test_non_finite_weight_names_the_weight_quantizer():
    net = _model("minmax-per-channel")
    net(torch.randn(4, 3, 8, 8))
    before = _state(net)
    with torch.no_grad():
        net.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"fc\.weight_quantizer"):
        net(torch.randn(4, 3, 8, 8))
    after = net.state_dict()
    fc_quantizers = [k for k in before if k.startswith("fc.weight_quantizer")]  # the inputs were clean: observed
    assert fc_quantizers and all(torch.equal(before[k], after[k]) for k in fc_quantizers)


class _NaNSamples(DigitsDataModule):
    """Digits with sample ``index`` (and every 64th after it) of each split set to NaN."""

    def __init__(self, index: int, **kw) -> None:
        super().__init__(shuffle=False, **kw)
        self.index = index

    def setup(self, stage=None) -> None:
        super().setup(stage)
        for split in (self.train_set, self.val_set, self.test_set):
            split.tensors[0][self.index :: 64] = float("nan")


def _all_finite(checkpoint: dict) -> None:
    """Every float tensor of the checkpoint is finite, except the ±inf "nothing seen yet" range of an observer
    that never observed (count 0): the quantizer state travels under the callback's own key too."""
    flat: dict[str, torch.Tensor] = {}
    stack = [("", checkpoint["state_dict"]), ("", checkpoint.get("lightning_quant", {}))]
    while stack:
        prefix, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((f"{prefix}.{k}", v) for k, v in item.items())
        elif isinstance(item, torch.Tensor):
            flat[prefix] = item
    assert flat
    for key, t in flat.items():
        unobserved = key.endswith(("min_val", "max_val")) and int(flat[key.rsplit(".", 1)[0] + ".count"]) == 0
        if t.is_floating_point() and not unobserved:
            assert torch.isfinite(t).all(), key


def test_qat_trainer_stops_at_the_nan_batch_with_a_clean_checkpoint(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier(DigitsCNN(width=8), optimizer="adam", lr=1e-3, epochs=1)
    trainer = quiet_trainer([QuantizationAwareTraining("lsq_w4a4")], max_epochs=1)
    with pytest.raises(NonFiniteInputError, match=r"net\.features\.0\.input_quantizer"):
        trainer.fit(model, datamodule=_NaNSamples(index=200))  # batch 4 of 64: after initialisation
    assert trainer.global_step == 3
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    _all_finite(torch.load(tmp_path / "after.ckpt", weights_only=True))


def test_ptq_calibration_with_a_nan_sample_names_the_layer(tmp_path):
    pl.seed_everything(0)
    float_model = ImageClassifier(DigitsCNN(width=8), optimizer="adam", lr=3e-3, epochs=1)
    quiet_trainer(max_epochs=1).fit(float_model, datamodule=DigitsDataModule())
    for recipe in ("minmax_w8a8", "percentile_w8a8", "mse_w4a8"):  # examples: one per activation observer
        model = copy.deepcopy(float_model)
        cb = PostTrainingQuantization(recipe, overrides=["diagnostics.summary=false"], num_samples=64)
        trainer = quiet_trainer([cb])
        with pytest.raises(NonFiniteInputError, match=r"net\.features\.0\.input_quantizer"):
            trainer.validate(model, datamodule=_NaNSamples(index=5), verbose=False)
        trainer.save_checkpoint(tmp_path / f"{recipe}.ckpt")
        _all_finite(torch.load(tmp_path / f"{recipe}.ckpt", weights_only=True))
