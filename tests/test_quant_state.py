"""Quantizer modes set through quant_state/set_modes, and post-training state that lives only while it trains."""

from pathlib import Path

import pytest
import torch

from lightning_quant import load_recipe, quantize_model
from lightning_quant.examples import DigitsCNN
from lightning_quant.ptq import PTQConfig, calibrate, finalize, quant_state, reconstruct, set_modes
from lightning_quant.quantizers import ObserverQuantizer, Quantizer
from lightning_quant.quantizers.modes import QuantModes

OLD_CHECKPOINT = Path(__file__).parent / "data" / "qdrop_w4a4_digits_cnn4_before_issue15.pt"


def _calibrated(recipe: str, width: int = 4) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = DigitsCNN(width=width)
    r = load_recipe(recipe)
    quantize_model(net, r.weights, r.activations, r.layers)
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    net.eval()
    calibrate(net, batches, lambda b: net(b))
    finalize(net)
    set_modes(net, fake_quant=True)
    return net, batches


def _modes(net: torch.nn.Module) -> list[QuantModes]:
    return [QuantModes.of(q) for q in net.modules() if isinstance(q, Quantizer)]


def test_quant_state_restores_each_quantizers_modes_on_exit_and_on_error():
    net, batches = _calibrated("minmax_w8a8")
    x = batches[0]
    first = net.features[0].input_quantizer
    set_modes([first], fake_quant=False, observe=True)  # one quantizer differs from the rest
    before = _modes(net)
    with torch.no_grad():
        quantized = net(x)
        with quant_state(net, fake_quant=False):
            floating = net(x)
        with quant_state(net, fake_quant=False, observe=True, calibrate=True, weights=False) as changed:
            assert changed and all(q.role == "activation" for q in changed)
            assert all(not q.fake_quant_enabled and q.observer_enabled and q.calibrating for q in changed)
            assert all(q.fake_quant_enabled for q in net.modules() if isinstance(q, Quantizer) and q.role == "weight")
    assert _modes(net) == before
    assert not torch.equal(quantized, floating)
    set_modes(net, fake_quant=False)
    with torch.no_grad():
        torch.testing.assert_close(net(x), floating)  # off means the float model
    set_modes(net, fake_quant=True)
    set_modes([first], fake_quant=False, observe=True)
    inside: list[bool] = []

    def fail_inside() -> None:
        with quant_state(net, fake_quant=True, observe=False):
            inside.append(first.fake_quant_enabled and not first.observer_enabled)
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert inside == [True]
    assert _modes(net) == before


def test_checkpoint_written_before_the_split_loads_and_gives_the_same_outputs():
    """A state dict written before issue 15 (fixed codes under ``...weight_quantizer.codes``) still loads."""
    saved = torch.load(OLD_CHECKPOINT, weights_only=True)
    assert saved["state_dict"]["features.3.weight_quantizer.codes"].numel() == 4 * 4 * 3 * 3
    net = DigitsCNN(width=4)
    r = load_recipe("qdrop_w4a4")
    quantize_model(net, r.weights, r.activations, r.layers)
    net.load_state_dict(saved["state_dict"], strict=True)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(saved["input"]), saved["output"], rtol=1e-6, atol=1e-6)
    assert set(net.state_dict()) == set(saved["state_dict"])  # the same keys are written today
    q = net.features[3].weight_quantizer
    codes = saved["state_dict"]["features.3.weight_quantizer.codes"].float()
    expected = (codes - q.zero_point.reshape(-1, 1, 1, 1)) * q.scale.reshape(-1, 1, 1, 1)
    assert torch.equal(net.features[3].quantized_weight(), expected)  # the codes, not the rounded float weight


def test_reconstruction_state_is_attached_only_while_a_unit_trains():
    net, batches = _calibrated("qdrop_w4a4")
    keys = list(net.state_dict())
    acts = [net.features[3].input_quantizer, net.features[7].input_quantizer]
    seen: list[tuple[bool, bool]] = []

    def watch(report):
        unit = net.features[3] if report.unit == "features.3" else None
        if unit is not None:
            state = unit.input_quantizer.reconstruction
            seen.append((unit.weight_quantizer.rounding is not None, state is not None and state.step is not None))

    reconstruct(
        net,
        batches,
        lambda b: net(b),
        PTQConfig(algorithm="qdrop", iters=4, batch_size=8),
        stage="joint",
        blocks=True,
        learn_weights=True,
        learn_activations=True,
        activations_on=True,
        drop_prob=0.5,
        progress=watch,
    )
    assert seen and all(rounding and step for rounding, step in seen)
    quantizers = [q for q in net.modules() if isinstance(q, ObserverQuantizer)]
    assert all(q.reconstruction is None and not list(q.parameters()) for q in quantizers)
    assert all(q.drop_prob == 0.0 and not q.training for q in acts)
    assert list(net.state_dict()) == keys  # nothing added, nothing reordered


def test_a_failed_unit_leaves_its_quantizers_as_they_were():
    net, batches = _calibrated("adaround_w4a8")
    q = net.features[0].weight_quantizer  # the first unit's: it fails at its first report

    def fail(report):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reconstruct(
            net,
            batches,
            lambda b: net(b),
            PTQConfig(algorithm="adaround", iters=4, batch_size=8),
            stage="weights",
            blocks=False,
            learn_weights=True,
            learn_activations=False,
            activations_on=True,
            progress=fail,
        )
    assert all(m.reconstruction is None for m in net.modules() if isinstance(m, ObserverQuantizer))
    assert not q.codes.numel()  # an interrupted rounding is not hardened into codes
    assert all(m.fake_quant_enabled for m in net.modules() if isinstance(m, Quantizer))
