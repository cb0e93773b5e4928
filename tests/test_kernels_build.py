"""The kernels' seam: the operators are registered for tracing (fake versions and autograd pass torch's opcheck),
and without ninja the library still trains, on the torch paths, after one warning that says how to get the fast
path."""

import os
import shutil
import subprocess
import sys

import torch

from lightning_quant.quantizers._kernels import build

OPS = torch.ops.lightning_quant

# A few QAT steps (observer W4A4) of a digits CNN on real digits; leaves the final logits in `logits`.
QAT_STEPS = """
import torch
from sklearn.datasets import load_digits
from lightning_quant import quantize_model
from lightning_quant.examples import DigitsCNN
from lightning_quant.quantizers import QuantizerConfig

data = load_digits()
x = torch.tensor(data.images[:64], dtype=torch.float32).unsqueeze(1) / 16.0 - 0.5
y = torch.tensor(data.target[:64])
torch.manual_seed(0)
net = DigitsCNN(width=8)
cfg = QuantizerConfig(method="observer", bits=4)
quantize_model(net, cfg, cfg)
opt = torch.optim.SGD(net.parameters(), lr=0.05)
for _ in range(3):
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad()
logits = net(x).detach()
"""

NO_NINJA = """
import sys, warnings
sys.modules["ninja"] = None  # `import ninja` raises ImportError
warnings.simplefilter("always")  # every warning shown: "once" must come from the loader itself
"""


def test_operators_pass_opcheck():
    """Fake versions, autograd registration and AOT dispatch of the fused operators, as torch.library checks them."""
    assert build.load() is not None  # a C++ compiler and ninja are part of the test environment
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 2).requires_grad_()
    scale = torch.tensor([0.02, 0.05, 0.1])
    zero_point = torch.tensor([0, 3, -2], dtype=torch.int32)
    torch.library.opcheck(OPS.affine_fake_quant.default, (x, scale, zero_point, 3, 25, -8, 7))
    step = torch.tensor([0.05, 0.1, 0.2], requires_grad=True)
    torch.library.opcheck(OPS.lsq_fake_quant.default, (x, step, 0.1, 3, 25, -8, 7, True))
    plain = x.detach()
    torch.library.opcheck(OPS.affine_forward.default, (plain, scale, zero_point, 3, 25, -8, 7))
    torch.library.opcheck(OPS.lsq_forward.default, (plain, step.detach(), 3, 25, -8, 7, False))
    grad = torch.randn_like(plain)
    torch.library.opcheck(OPS.lsq_backward.default, (grad, plain, step.detach(), 0.1, 3, 25, -8, 7))


def _path_without_ninja() -> str:
    """PATH with every directory that holds a ninja binary left out."""
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not shutil.which("ninja", path=d)]
    return os.pathsep.join(kept)


def test_without_ninja_qat_runs_on_the_torch_paths_after_one_warning(tmp_path):
    out = tmp_path / "logits.pt"
    env = {**os.environ, "PATH": _path_without_ninja(), "LIGHTNING_QUANT_KERNELS": "auto"}
    code = NO_NINJA + QAT_STEPS + f"torch.save(logits, {str(out)!r})\n"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("fused CPU fake-quant kernels unavailable (ninja is not installed)") == 1, run.stderr
    assert "pip install 'lightning-quant[kernels]'" in run.stderr

    scope: dict = {}
    exec(QAT_STEPS, scope)  # the same steps here, on the fused kernels
    assert build.load() is not None
    assert torch.equal(torch.load(out, weights_only=True), scope["logits"])  # the torch paths: the same values
