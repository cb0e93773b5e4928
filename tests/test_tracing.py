"""The fused kernels are torch operators: torch.jit.trace and make_fx record them (trace parity), and a compiled QAT
forward settles into one graph without reaching dynamo's recompile limit."""

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from lightning_quant import quantize_model
from lightning_quant.examples import DigitsCNN
from lightning_quant.quantizers import QuantizerConfig
from lightning_quant.quantizers._kernels import build


def _trained(method: str) -> nn.Module:
    torch.manual_seed(0)
    net = DigitsCNN(width=8)
    cfg = QuantizerConfig(method=method, bits=4)
    quantize_model(net, cfg, cfg)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(3):
        net(torch.randn(32, 1, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net.eval()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "python"])
@pytest.mark.parametrize("method", ["lsq", "observer"])
def test_jit_trace_matches_the_model(method, fused):
    build.set_enabled(fused)
    try:
        net = _trained(method)
        x = torch.randn(16, 1, 8, 8)
        with torch.no_grad():
            traced = torch.jit.trace(net, x, check_trace=False)
            other = torch.randn(16, 1, 8, 8)
            torch.testing.assert_close(traced(other), net(other), rtol=0, atol=0)
        if fused:
            assert "lightning_quant::" in str(traced.inlined_graph)  # the operator, not its empty output buffer
    finally:
        build.set_enabled(True)


def test_make_fx_records_the_operators():
    net = _trained("lsq")
    gm = make_fx(net)(torch.randn(4, 1, 8, 8))
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any(o.startswith("lightning_quant.") for o in ops), ops
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)


def _deep() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()]
    layers += [m for _ in range(5) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())]
    layers += [nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU()]
    layers += [m for _ in range(4) for m in (nn.Linear(32, 32), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(32, 10))


@pytest.mark.parametrize("method", ["observer", "pact"])
def test_compiled_qat_forward_stays_under_the_recompile_limit(method):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _deep()
    weights = QuantizerConfig(method="observer" if method == "pact" else method, bits=4)
    quantize_model(net, weights, QuantizerConfig(method=method, bits=4))
    net[0].weight_quantizer.bits = 8  # layers that differ in a guard (bits, rank, requires_grad) share code objects
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        step = torch.compile(net.forward, backend="eager")
        for i in range(12):  # initialisation, then the observers freeze at step 8
            for q in net.modules():
                if hasattr(q, "observer_enabled"):
                    q.observer_enabled = i < 8
            step(torch.randn(16, 1, 4, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    steady = torch.compile(net.forward, backend="eager", fullgraph=True)  # no graph break once initialised
    steady(torch.randn(16, 1, 4, 4)).sum().backward()
