import math

import pytest
import torch

from lightning_quant.quantizers import (
    QUANTIZERS,
    DoReFaQuantizer,
    DSQQuantizer,
    LSQQuantizer,
    ObserverQuantizer,
    PACTQuantizer,
    QuantizerConfig,
    build_quantizer,
    fake_quantize,
    int_range,
    qparams_from_range,
)
from lightning_quant.quantizers.binary import BinaryQuantizer
from lightning_quant.quantizers.functional import row_aminmax, tensor_aminmax
from lightning_quant.quantizers.observers import build_observer


@pytest.mark.parametrize(
    ("bits", "signed", "expected"),
    [(2, True, (-2, 1)), (3, True, (-4, 3)), (4, False, (0, 15)), (8, True, (-128, 127)), (8, False, (0, 255))],
)
def test_int_range(bits, signed, expected):
    assert int_range(bits, signed) == expected


def test_fake_quantize_per_tensor_exact():
    x = torch.tensor([-1.3, -1.0, -0.26, 0.0, 0.24, 0.5, 0.88, 2.0])
    y = fake_quantize(x, torch.tensor([0.25]), torch.tensor([0], dtype=torch.int32), -4, 3)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, -0.25, 0.0, 0.25, 0.5, 0.75, 0.75]))


def test_asymmetric_qparams_and_values():
    scale, zp = qparams_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), 0, 255, symmetric=False)
    assert scale.item() == pytest.approx(4 / 255)
    assert zp.item() == 64  # 0 - round(-1 / (4/255)) = round(63.75)
    x = torch.tensor([-1.0, 0.0, 3.0, 5.0])
    y = fake_quantize(x, scale, zp, 0, 255)
    assert y[1].item() == 0.0  # zero is exact
    assert y[3].item() == pytest.approx((255 - 64) * 4 / 255)  # clipped at the top code


def test_symmetric_unsigned_qparams():
    scale, zp = qparams_from_range(torch.tensor([0.0]), torch.tensor([3.0]), 0, 15, symmetric=True)
    assert scale.item() == pytest.approx(0.2)
    assert zp.item() == 0


def test_per_channel_any_axis():
    x = torch.tensor([[0.3, 0.3], [0.3, 0.3]])
    scale = torch.tensor([0.5, 0.25])
    zp = torch.zeros(2, dtype=torch.int32)
    rows = fake_quantize(x, scale, zp, -8, 7, "per_channel", axis=0)
    cols = fake_quantize(x, scale, zp, -8, 7, "per_channel", axis=1)
    assert torch.equal(rows, torch.tensor([[0.5, 0.5], [0.25, 0.25]]))
    assert torch.equal(cols, torch.tensor([[0.5, 0.25], [0.5, 0.25]]))


def test_per_group_values():
    w = torch.randn(4, 64)
    cfg = QuantizerConfig(method="observer", bits=3, granularity="per_group", group_size=16)
    q = build_quantizer(cfg, "weight", num_groups=4 * 64 // 16)
    y = q(w)
    for group in y.reshape(-1, 16):
        assert group.unique().numel() <= 2**3
    # each group uses its own scale: its max magnitude is representable
    assert torch.allclose(y.reshape(-1, 16).abs().amax(1), w.reshape(-1, 16).abs().amax(1), rtol=0.2)


def test_fused_kernel_ste_gradient():
    x = torch.tensor([-3.0, -0.4, 0.1, 0.6, 2.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor([0.5]), torch.tensor([0], dtype=torch.int32), -2, 1)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))  # 1 inside [-1, 0.5], 0 outside


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_step_gradient_matches_formula(bits, signed):
    cfg = QuantizerConfig(method="lsq", bits=bits, signed=signed)
    q = LSQQuantizer(cfg, "weight")
    x = torch.randn(1000) * 2
    q(x)  # initialise
    with torch.no_grad():
        q.scale.fill_(0.3)
    q.scale.grad = None
    q(x).sum().backward()
    qmin, qmax = int_range(bits, signed)
    v = x / 0.3
    per_elem = torch.where(
        v < qmin, torch.tensor(float(qmin)), torch.where(v > qmax, torch.tensor(float(qmax)), v.round() - v)
    )
    g = 1 / math.sqrt(x.numel() * qmax)
    assert q.scale.grad.item() == pytest.approx(per_elem.sum().item() * g, rel=1e-4)


def test_lsq_init_and_values():
    x = torch.linspace(-1, 1, 101)
    q = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), "weight")
    y = q(x)
    assert q.scale.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-5)
    assert y.unique().numel() <= 16
    assert torch.allclose(y / q.scale.detach(), (y / q.scale.detach()).round(), atol=1e-4)


def test_lsq_plus_learns_offset():
    x = torch.rand(500) * 3 + 1  # all positive, offset matters
    q = LSQQuantizer(QuantizerConfig(method="lsq", bits=4, learn_offset=True, signed=False), "activation")
    y = q(x.unsqueeze(0))
    assert q.offset is not None
    assert q.offset.item() == pytest.approx(x.min().item(), rel=1e-4)
    assert (y - x).abs().max() <= q.scale.item() / 2 + 1e-5
    y.sum().backward()
    assert q.offset.grad is not None


def test_pact_clip_gradient():
    q = PACTQuantizer(QuantizerConfig(method="pact", bits=4, clip_init=2.0, clip_decay=0.0, signed=False), "activation")
    x = torch.tensor([[-1.0, 0.5, 1.0, 2.5, 3.0]])
    y = q(x)
    assert y[0, 0] == 0
    assert y[0, 3] == 2.0
    assert y[0, 4] == 2.0
    y.sum().backward()
    assert q.alpha.grad.item() == pytest.approx(2.0)  # two inputs at or above alpha


def test_pact_l2_penalty_in_gradient():
    q = PACTQuantizer(QuantizerConfig(method="pact", bits=4, clip_init=2.0, clip_decay=0.1, signed=False), "activation")
    q(torch.tensor([[0.5]])).sum().backward()
    assert q.alpha.grad.item() == pytest.approx(0.1 * 2.0)


def test_dorefa_weights_hand_checked():
    q = DoReFaQuantizer(QuantizerConfig(method="dorefa", bits=2), "weight")
    w = torch.tensor([-2.0, -0.1, 0.0, 0.3, 2.0])
    t = torch.tanh(w)
    t = t / (2 * t.abs().max()) + 0.5
    expected = 2 * torch.round(t * 3) / 3 - 1
    assert torch.allclose(q(w), expected)
    assert q(w).unique().numel() <= 4


def test_dorefa_one_bit_is_scaled_sign():
    w = torch.tensor([-2.0, -0.5, 1.0, 3.0])
    q = DoReFaQuantizer(QuantizerConfig(method="dorefa", bits=1), "weight")
    assert torch.allclose(q(w), torch.sign(w) * w.abs().mean())


def test_dsq_forward_is_hard_and_alpha_learns():
    q = DSQQuantizer(QuantizerConfig(method="dsq", bits=2), "activation")
    x = torch.linspace(0, 3, 31).unsqueeze(0)
    y = q(x)
    assert torch.allclose(y.unique(), torch.tensor([0.0, 1.0, 2.0, 3.0]), atol=1e-5)
    y.sum().backward()
    assert q.alpha.grad is not None
    assert q.alpha.grad.abs().item() > 0
    assert q.lower.grad is not None
    assert q.upper.grad is not None


MULTI_BIT = sorted(m for m in QUANTIZERS.names() if not issubclass(QUANTIZERS[m].handler, BinaryQuantizer))


@pytest.mark.parametrize("method", MULTI_BIT)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_quantizer_levels_and_gradients(method, bits):
    """Every multi-bit quantizer (binary ones have their own tests in test_binary.py)."""
    qcls = QUANTIZERS[method].handler
    role = "weight" if "weight" in qcls.roles else "activation"
    q = build_quantizer(QuantizerConfig(method=method, bits=bits), role)
    x = torch.randn(8, 16, requires_grad=True)
    y = q(x)
    assert y.shape == x.shape
    rows = y if method == "dynamic" else y.reshape(1, -1)  # dynamic: one grid per token (row)
    assert max(row.unique().numel() for row in rows) <= 2**bits
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in q.parameters():
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()


def test_disabled_quantizer_is_identity():
    q = ObserverQuantizer(QuantizerConfig(bits=2), "activation")
    q.fake_quant_enabled = False
    x = torch.randn(5)
    assert torch.equal(q(x), x)


def test_auto_sign_from_first_batch():
    q = ObserverQuantizer(QuantizerConfig(bits=4), "activation")
    q(torch.rand(10))
    assert not bool(q.signed)
    assert (q.qmin, q.qmax) == (0, 15)
    q2 = ObserverQuantizer(QuantizerConfig(bits=4), "activation")
    q2(torch.randn(10))
    assert bool(q2.signed)
    assert (q2.qmin, q2.qmax) == (-8, 7)


def test_quantizer_state_roundtrip_and_float_checkpoint_tolerance():
    q = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), "weight")
    q(torch.randn(100))
    fresh = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), "weight")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.scale, q.scale)
    assert fresh._initialized
    untouched = LSQQuantizer(QuantizerConfig(method="lsq", bits=4), "weight")
    result = untouched.load_state_dict({}, strict=True)  # absent state: kept, not an error
    assert not result.missing_keys
    assert not untouched._initialized


# -- observers on known distributions -----------------------------------------------------------------


def test_minmax_observer_running_range():
    obs = build_observer("minmax")
    obs(torch.tensor([[-1.0, 2.0]]))
    obs(torch.tensor([[-3.0, 1.0]]))
    assert obs.min_val.item() == -3.0
    assert obs.max_val.item() == 2.0


def test_ema_observer():
    obs = build_observer("ema", momentum=0.5)
    obs(torch.tensor([[0.0, 4.0]]))
    obs(torch.tensor([[0.0, 2.0]]))
    assert obs.max_val.item() == pytest.approx(3.0)


def test_percentile_observer_on_gaussian():
    obs = build_observer("percentile", percentile=99.0)
    obs(torch.randn(1, 200_000))
    assert obs.max_val.item() == pytest.approx(2.326, abs=0.05)
    assert obs.min_val.item() == pytest.approx(-2.326, abs=0.05)


def test_mse_observer_clips_gaussian_tails_at_low_bits():
    x = torch.randn(1, 100_000)
    obs = build_observer("mse", bits=4)
    obs(x)
    ratio = obs.max_val.item() / x.max().item()
    assert 0.3 < ratio < 0.95  # a Gaussian's optimal 4-bit clip is well inside its extremes

    # and it beats plain min-max in L2 error
    def err(lo, hi):
        s, z = qparams_from_range(torch.tensor([lo]), torch.tensor([hi]), -8, 7, False)
        return (fake_quantize(x, s, z, -8, 7) - x).pow(2).mean().item()

    assert err(obs.min_val.item(), obs.max_val.item()) < err(x.min().item(), x.max().item())


def test_per_channel_observer_quantizer():
    w = torch.stack([torch.linspace(-1, 1, 50), torch.linspace(-4, 4, 50)])
    q = ObserverQuantizer(QuantizerConfig(bits=8, granularity="per_channel", axis=0), "weight", num_groups=2)
    q(w)
    assert torch.allclose(q.scale, torch.tensor([1 / 127.5, 4 / 127.5]))


def test_per_tensor_range_is_taken_from_the_tensor_as_it_lies_in_memory():
    """Min-max and EMA observers reduce a per-tensor activation without flattening it (a flattened view of a
    channels-last tensor is a copy in eager mode and a gather under torch.compile): the same range."""
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    lo, hi = tensor_aminmax(x)
    assert (lo, hi) == row_aminmax(x.reshape(1, -1))
    for observer in ("minmax", "ema", "percentile"):
        q = ObserverQuantizer(QuantizerConfig(observer=observer), "activation")
        q.train()
        q(x)
        q(x * 2)  # an observation after initialisation
        ref = ObserverQuantizer(QuantizerConfig(observer=observer), "activation")
        ref.observer(ref.rows(x))
        ref.observer(ref.rows(x * 2))
        assert torch.equal(q.observer.min_val, ref.observer.min_val)
        assert torch.equal(q.observer.max_val, ref.observer.max_val)
