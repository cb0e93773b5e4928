"""The fast eager paths (compiled one-pass kernels for large tensors, in-place ATen ops for medium and small
ones) give the same values and gradients as torch's reference fake-quant ops."""

import pytest
import torch

from lightning_quant.quantizers import LSQQuantizer, QuantizerConfig, fake_quantize
from lightning_quant.quantizers import _kernels as kernels
from lightning_quant.quantizers._kernels import build

SIZES = {  # one tensor shape per path
    "generated": (8, 16, 48, 48),  # >= kernels.MIN_NUMEL: compiled one-pass kernels
    "in-place": (8, 16, 12, 12),  # between the thresholds: in-place ATen ops (affine and LSQ)
    "small": (8, 16, 2, 2),  # < kernels.EAGER_MIN_NUMEL: torch's kernel (affine), in-place ops (LSQ)
}


def _tensor(shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.randn(*shape) * 2).requires_grad_()


@pytest.fixture(params=list(SIZES.values()), ids=list(SIZES))
def sized(request) -> torch.Tensor:
    return _tensor(request.param)


@pytest.fixture
def big() -> torch.Tensor:
    return _tensor(SIZES["generated"])


@pytest.fixture(autouse=True, params=["fused", "python"])
def backend(request):
    """Every test runs with the fused C++ kernels and with the Python paths they replace."""
    build.set_enabled(request.param == "fused")
    yield request.param
    build.set_enabled(True)


def test_fused_kernels_build(backend):
    if backend == "fused":
        assert build.load() is not None  # a C++ compiler is part of the test environment


def test_sizes_reach_each_path():
    numel = {k: torch.Size(v).numel() for k, v in SIZES.items()}
    assert numel["generated"] >= kernels.MIN_NUMEL
    assert kernels.EAGER_MIN_NUMEL <= numel["in-place"] < kernels.MIN_NUMEL
    assert numel["small"] < kernels.EAGER_MIN_NUMEL


def _run_both(fn, x):
    results = []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        try:
            assert kernels.applies(x) is enabled
            x.grad = None
            y = fn(x)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            results.append((y.detach(), x.grad.clone()))
        finally:
            kernels.set_enabled(True)
    return results


@pytest.mark.parametrize(
    ("granularity", "axis", "n"), [("per_tensor", 0, 1), ("per_channel", 1, 16), ("per_channel", 0, 8)]
)
def test_affine_kernel_matches_torch(sized, granularity, axis, n):
    scale = torch.linspace(0.01, 0.05, n)
    zero_point = torch.arange(n, dtype=torch.int32) % 5 - 2
    (y1, g1), (y0, g0) = _run_both(lambda x: fake_quantize(x, scale, zero_point, -8, 7, granularity, axis), sized)
    assert torch.equal(y1, y0)  # bit-identical: both compute round(x * (1/s)) + zp
    assert torch.equal(g1, g0)  # same clipping mask
    assert 0 < (g1 == 0).float().mean() < 1  # the test range clips some values, not all


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_lsq_kernel_matches_eager_lsq(sized, granularity):
    grads = []
    outs = []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        try:
            groups = 1 if granularity == "per_tensor" else 8
            q = LSQQuantizer(QuantizerConfig(method="lsq", bits=3, granularity=granularity), "weight", groups)
            x = sized.detach().clone().requires_grad_()
            y = q(x)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            outs.append(y.detach())
            grads.append((x.grad, q.scale.grad))
        finally:
            kernels.set_enabled(True)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("granularity", "axis", "n"), [("per_tensor", 0, 1), ("per_channel", 1, 16)])
def test_compiled_fake_quantize_matches_torch_in_values_and_gradients(big, granularity, axis, n):
    """Under torch.compile the straight-through mask is recomputed in the backward (not saved): same results."""
    scale = torch.linspace(0.01, 0.05, n)
    zero_point = torch.arange(n, dtype=torch.int32) % 5 - 2
    weights = torch.linspace(-1, 1, big.numel()).reshape(big.shape)

    def fq(x):
        return fake_quantize(x, scale, zero_point, -8, 7, granularity, axis)

    results = []
    for fn in (torch.compile(fq, backend="inductor", fullgraph=True), fq):
        kernels.set_enabled(False)  # the eager reference: torch's own fused fake-quant kernels
        try:
            big.grad = None
            y = fn(big)
            (y * weights).sum().backward()
            results.append((y.detach(), big.grad.clone()))
        finally:
            kernels.set_enabled(True)
    (y1, g1), (y0, g0) = results
    assert torch.equal(y1, y0)
    assert torch.equal(g1, g0)
    assert 0 < (g1 == 0).float().mean() < 1


def _observer_steps(q, shape, steps=4):
    """Train-mode forward/backward passes over inputs whose range drifts; returns everything that must match."""
    torch.manual_seed(1)
    seen = []
    for i in range(steps):
        x = (torch.randn(*shape) * (1 + i) + 0.3 * i).requires_grad_()
        y = q(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        seen += [y.detach(), x.grad, *[b.clone() for b in q.buffers()]]
    return seen


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize(
    ("role", "observer", "granularity", "symmetric", "bits"),
    [
        ("activation", "ema", "per_tensor", False, 8),
        ("activation", "ema", "per_tensor", True, 8),
        ("activation", "minmax", "per_tensor", False, 4),
        ("weight", "minmax", "per_tensor", True, 4),
        ("weight", "minmax", "per_channel", True, 8),
        ("weight", "minmax", "per_channel", True, 3),
    ],
)
def test_observer_cpu_path_matches_tensor_path(size, role, observer, granularity, symmetric, bits):
    """The eager CPU path of observer quantizers (float32 scalar qparams, in-place per-channel ranges) gives the
    same outputs, gradients, ranges, scales and zero points, to the bit, as the tensor path on every step."""
    from lightning_quant.quantizers import build_quantizer

    cfg = QuantizerConfig(observer=observer, granularity=granularity, symmetric=symmetric, bits=bits, momentum=0.1)
    shape = SIZES[size]
    runs = []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        try:
            q = build_quantizer(cfg, role, shape[0] if granularity == "per_channel" else 1).train()
            runs.append(_observer_steps(q, shape))
            q.observer_enabled = False  # frozen ranges take the same path
            runs[-1] += _observer_steps(q, shape, steps=1)
        finally:
            kernels.set_enabled(True)
    assert len(runs[0]) == len(runs[1])
    for fast, reference in zip(*runs):
        assert torch.equal(fast, reference)


def test_per_tensor_qparams_reject_nan_ranges():
    from lightning_quant.quantizers import build_quantizer

    q = build_quantizer(QuantizerConfig(observer="ema", symmetric=False), "activation").train()
    q(torch.randn(64))
    with pytest.raises(ValueError, match="NaN"):
        q(torch.full((64,), float("nan")))


def test_observer_cpu_path_reads_channels_last_activations():
    """A channels-last activation is quantized as it lies in memory: same values and gradients, same layout."""
    from lightning_quant.quantizers import build_quantizer

    x = torch.randn(8, 16, 12, 12).to(memory_format=torch.channels_last)
    results = []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        try:
            q = build_quantizer(QuantizerConfig(observer="ema", symmetric=False), "activation").train()
            q(x)
            xi = x.clone().requires_grad_()
            y = q(xi)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            results.append((y.detach(), xi.grad, q.scale.clone(), q.zero_point.clone()))
        finally:
            kernels.set_enabled(True)
    for fast, reference in zip(*results):
        assert torch.equal(fast, reference)
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)
