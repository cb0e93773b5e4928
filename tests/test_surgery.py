import re

import pytest
import torch
import torch.fx
from torch import nn

from lightning_quant.nn import (
    LayerOverride,
    LayerSelection,
    LayerSelectionError,
    dequantize_model,
    quantize_model,
    summarize,
)
from lightning_quant.nn.modules import QuantConv2d, QuantizedLayer
from lightning_quant.ptq import set_quant_state
from lightning_quant.quantizers import QuantizerConfig

W4 = QuantizerConfig(method="lsq", bits=4)
A4 = QuantizerConfig(method="lsq", bits=4)


def small_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def test_swap_keeps_parameters_and_isinstance():
    net = small_net()
    w = net[3].weight
    report = quantize_model(net, W4, A4)
    assert isinstance(net[3], nn.Conv2d)
    assert isinstance(net[3], QuantConv2d)
    assert net[3].weight is w
    assert [r.weight_bits for r in report.quantized] == [8, 4, 8]  # first/last at 8 bit by default
    assert "layers.first_layer=8bit" in report.table()
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    assert net[3].weight_quantizer.scale.grad is not None


def test_first_last_float_and_overrides():
    net = small_net()
    sel = LayerSelection(first_layer="float", last_layer="same", overrides=[LayerOverride(pattern="3", weight_bits=2)])
    report = quantize_model(net, W4, A4, sel)
    assert not isinstance(net[0], QuantizedLayer)
    assert net[3].weight_quantizer.bits == 2
    assert net[3].input_quantizer.bits == 4
    assert net[7].weight_quantizer.bits == 4
    assert report.layers[0].status == "float"
    assert "first_layer=float" in report.layers[0].reason


def test_include_exclude_and_skip():
    net = small_net()
    sel = LayerSelection(exclude=["7"], overrides=[LayerOverride(pattern="0", skip=True)])
    quantize_model(net, W4, A4, sel)
    assert [isinstance(m, QuantizedLayer) for m in (net[0], net[3], net[7])] == [False, True, False]


def test_unsupported_layer_warns_and_stays_float():
    class WithRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 4)
            self.head = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(1))  # used functionally

        def forward(self, x):
            return self.head(self.rnn(x)[0]) * self.scale

    net = WithRNN()
    report = quantize_model(net, W4, A4)
    assert isinstance(net.head, QuantizedLayer)
    assert not isinstance(net.rnn, QuantizedLayer)
    assert any("'rnn' (GRU)" in w for w in report.warnings)
    assert any("'' (WithRNN)" in w or "(WithRNN)" in w for w in report.warnings)


def test_weight_tying_and_shared_modules_survive():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.shared = nn.Linear(8, 8)
            self.out = nn.Linear(8, 20, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            h = self.shared(self.shared(self.emb(ids)))  # the same module twice
            return self.out(h)

    net = Tied()
    sel = LayerSelection(types=["Linear", "Embedding"], first_layer="same", last_layer="same")
    report = quantize_model(net, W4, A4, sel)
    assert net.out.weight is net.emb.weight
    assert len(report.quantized) == 3  # emb, shared (once), out
    net(torch.randint(0, 20, (2, 5))).sum().backward()
    assert net.emb.weight.grad is not None


def test_untraceable_model_with_dict_input():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, batch):
            x = batch["x"]
            if x.sum() > 0:  # data-dependent control flow
                x = self.a(x)
            return self.b(x)

    net = Branchy()
    with pytest.raises(Exception):  # noqa: PT011 - torch.fx cannot trace this model at all
        torch.fx.symbolic_trace(net)
    quantize_model(net, W4, A4, LayerSelection(first_layer="same", last_layer="same"))
    out = net({"x": torch.randn(4, 6).abs()})
    assert out.shape == (4, 3)
    assert isinstance(net.a, QuantizedLayer)


def test_bn_folding_matches_float_in_eval():
    torch.manual_seed(0)
    net = small_net()
    net.train()
    for _ in range(3):  # give BN non-trivial running statistics
        net(torch.randn(16, 1, 8, 8))
    net.eval()
    x = torch.randn(4, 1, 8, 8)
    expected = net(x)
    quantize_model(net, W4, A4, LayerSelection(fold_bn=True))
    for m in net.modules():
        if hasattr(m, "fake_quant_enabled"):
            m.fake_quant_enabled = False
    assert net[3].folded_bn is net[4]
    assert torch.allclose(net(x), expected, atol=1e-5)
    keys = set(net.state_dict())
    assert {"1.running_mean", "4.weight"} <= keys  # the float model's keys are unchanged


def test_bn_folding_training_updates_running_stats():
    net = small_net()
    quantize_model(net, W4, A4, LayerSelection(fold_bn=True))
    before = net[4].running_mean.clone()
    net.train()
    net(torch.randn(8, 1, 8, 8)).sum().backward()
    assert not torch.equal(before, net[4].running_mean)
    assert net[3].weight.grad is not None
    assert net[4].weight.grad is not None


def test_dequantize_roundtrip():
    net = small_net()
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    quantize_model(net, W4, A4, LayerSelection(fold_bn=True))
    dequantize_model(net)
    assert type(net[3]) is nn.Conv2d
    assert type(net[4]) is nn.BatchNorm2d
    assert set(net.state_dict()) == set(ref)


def test_output_quantizers_on_the_layers_named():
    net = small_net().eval()
    keys = set(net.state_dict())
    observer4 = QuantizerConfig(method="observer", bits=4)
    sel = LayerSelection(first_layer="same", last_layer="same", quantize_outputs=["3"])
    report = quantize_model(net, observer4, observer4, sel)
    assert "output_quantizer" in net[3]._modules and "output_quantizer" not in net[0]._modules
    assert [r.reason for r in report.layers if r.name == "3"] == ["output quantized"]
    x = torch.randn(8, 1, 8, 8)
    net(x)  # the first batch sets the ranges
    out = net[3](net[2](net[1](net[0](x))))
    assert len(torch.unique(out)) <= 16  # on a 4-bit grid
    assert len(torch.unique(net[0](x))) > 16  # not quantized
    assert any(k.startswith("3.output_quantizer.") for k in net.state_dict())
    dequantize_model(net)
    assert set(net.state_dict()) == keys


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class _Pair(nn.Module):
    def forward(self, x):
        return x, x


def test_output_quantizers_on_blocks_that_are_not_layers():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _Block(), _Block(), nn.Flatten(), nn.Linear(256, 3)).eval()
    keys = set(net.state_dict())
    observer4 = QuantizerConfig(method="observer", bits=4)
    sel = LayerSelection(first_layer="same", last_layer="same", quantize_outputs=["1", "2"])
    report = quantize_model(net, observer4, observer4, sel)
    assert [(r.name, r.reason) for r in report.layers if r.name in ("1", "2")] == [
        ("1", "output quantized"),
        ("2", "output quantized"),
    ]
    x = torch.randn(8, 1, 8, 8)
    net(x)  # the first batch sets the ranges
    block_out = net[1](net[0](x))
    assert len(torch.unique(block_out)) <= 16  # the residual sum is on a 4-bit grid
    assert any(k.startswith("1.output_quantizer.") for k in net.state_dict())
    quantize_model(net, observer4, observer4, sel)  # a second call adds nothing
    assert len(net[1]._forward_hooks) == 1
    set_quant_state(net, weights=False, activations=False)
    assert not net[1].output_quantizer.fake_quant_enabled
    dequantize_model(net)
    assert set(net.state_dict()) == keys and not net[1]._forward_hooks


def test_output_quantizer_on_a_module_returning_a_tuple_is_a_clear_error():
    net = nn.Sequential(nn.Linear(4, 4), _Pair())
    quantize_model(net, W4, A4, LayerSelection(quantize_outputs=["1"]))
    with pytest.raises(TypeError, match="matched '1', whose output is a tuple"):
        net(torch.randn(2, 4))


def test_input_quantizers_on_blocks_that_are_not_layers():
    """A block's input quantizer (a pre-hook) puts what both its conv and its residual addition see on one grid."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _Block(), _Block(), nn.Flatten(), nn.Linear(256, 3)).eval()
    keys = set(net.state_dict())
    observer4 = QuantizerConfig(method="observer", bits=4)
    sel = LayerSelection(first_layer="same", last_layer="same", quantize_inputs=["1", "0", "3*"])
    report = quantize_model(net, observer4, observer4, sel)
    # a layer ("0") quantizes its input already; Flatten ("3") is a module like a block
    assert [(r.name, r.reason) for r in report.layers if "input" in r.reason] == [
        ("1", "input quantized"),
        ("3", "input quantized"),
    ]
    seen = []
    net[1].conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(8, 1, 8, 8)
    net(x)  # the first batch sets the ranges
    block_in = net[1].input_quantizer(net[0](x))
    assert len(torch.unique(block_in)) <= 16 and torch.equal(seen[-1], block_in)
    assert any(k.startswith("1.input_quantizer.") for k in net.state_dict())
    quantize_model(net, observer4, observer4, sel)  # a second call adds nothing
    assert len(net[1]._forward_pre_hooks) == 1
    dequantize_model(net)
    assert set(net.state_dict()) == keys and not net[1]._forward_pre_hooks and not net[3]._forward_pre_hooks


def test_input_quantizer_on_a_module_taking_a_tuple_is_a_clear_error():
    net = nn.Sequential(_Pair(), _Pair())
    quantize_model(net, W4, A4, LayerSelection(quantize_inputs=["1"]))
    with pytest.raises(TypeError, match="matched '1', whose input is a tuple"):
        net(torch.randn(2, 4))
    with pytest.raises(TypeError, match="matched '1', which was called without a positional input"):
        net[1](x=torch.randn(2, 4))


def test_second_call_keeps_existing_quantizers():
    net = small_net()
    quantize_model(net, W4, A4)
    scale = net[3].weight_quantizer.scale
    report = quantize_model(net, W4, A4)
    assert net[3].weight_quantizer.scale is scale
    assert all(r.reason == "already quantized" for r in report.quantized)


def test_second_call_keeps_first_and_last_layers_float():
    """A second trainer.validate/predict prepares again; the edge layers left float must stay float."""
    net = small_net()
    sel = LayerSelection(first_layer="float", last_layer="float")
    quantize_model(net, W4, A4, sel)
    report = quantize_model(net, W4, A4, sel)
    assert not isinstance(net[0], QuantizedLayer) and not isinstance(net[7], QuantizedLayer)
    assert [r.status for r in report.layers][0] == "float"


def test_conv_transpose_and_conv1d_3d():
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv1d(4, 4, 3), nn.Conv1d(4, 2, 3))
    quantize_model(net, QuantizerConfig(bits=4, granularity="per_channel"), A4)
    assert net(torch.randn(2, 2, 10)).shape == (2, 2, 4)
    up = nn.Sequential(nn.ConvTranspose2d(3, 5, 2, stride=2), nn.ConvTranspose2d(5, 2, 2, stride=2))
    quantize_model(
        up,
        QuantizerConfig(bits=4, granularity="per_channel"),
        A4,
        LayerSelection(types=["ConvTranspose2d"], first_layer="same", last_layer="same"),
    )
    assert up[0].weight_quantizer.num_groups == 5  # output channels are axis 1 of a transposed weight
    assert up(torch.randn(1, 3, 4, 4)).shape == (1, 2, 16, 16)
    vol = nn.Sequential(nn.Conv3d(1, 2, 3))
    quantize_model(vol, W4, A4, LayerSelection(first_layer="same"))
    assert vol(torch.randn(1, 1, 5, 5, 5)).shape == (1, 2, 3, 3, 3)


def test_bit_aware_summary():
    net = small_net()
    quantize_model(net, W4, A4, LayerSelection(first_layer="same", last_layer="same"))
    s = summarize(net, torch.randn(1, 1, 8, 8))
    conv = s.layers[1]
    assert conv.macs == 8 * 8 * 4 * 4 * 9  # out pixels x out ch x in ch x kernel
    assert conv.bops == conv.macs * 16
    assert conv.memory_bits == 4 * 4 * 9 * 4 + 4 * 32
    assert s.compression > 5
    assert "float total" in s.table()
    # the summary forward changed no quantizer state
    assert not net[3].weight_quantizer._initialized


@pytest.mark.parametrize(
    ("key", "selection"),
    [
        ("layers.quantize_outputs", LayerSelection(quantize_outputs=["3", "blocks.*"])),
        ("layers.quantize_inputs", LayerSelection(quantize_inputs=["blocks.*"])),
        ("layers.include", LayerSelection(include=["0", "blocks.*"])),
        ("layers.exclude", LayerSelection(exclude=["blocks.*"])),
        ("layers.overrides[0].pattern", LayerSelection(overrides=[LayerOverride(pattern="blocks.*", skip=True)])),
    ],
)
def test_a_glob_that_matches_no_module_is_refused_by_name(key, selection):
    net = small_net()
    with pytest.raises(LayerSelectionError, match=rf"{re.escape(key)}: the glob 'blocks\.\*' matches no module"):
        quantize_model(net, W4, A4, selection)
    assert not any(isinstance(m, QuantizedLayer) for m in net.modules())  # refused before any change
