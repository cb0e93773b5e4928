"""The one seam to the fast CPU fake-quant kernels (private: only ``lightning_quant.quantizers`` uses it).

- :mod:`.build` compiles and loads the fused C++ operators of ``csrc/`` (``torch.ops.lightning_quant.*``);
  without ninja or a compiler it warns once and returns None.
- :mod:`.fakes` registers their shape-only versions for make_fx, torch.export and torch.compile (their autograd
  is registered in the C++ source).
- :mod:`.ops` dispatches each fake quantization to the fused operator, a generated kernel or torch ops, all with
  the values and gradients of torch's reference fake-quant ops.

Usage::

    from lightning_quant.quantizers import _kernels as kernels

    if kernels.applies(x):
        y = kernels.lsq_fake_quant(x, step, grad_factor, qmin, qmax, axis, owner)
    fused = kernels.load()  # the compiled module, or None
"""

from lightning_quant.quantizers._kernels import build, ops
from lightning_quant.quantizers._kernels.build import load
from lightning_quant.quantizers._kernels.ops import (
    EAGER_MIN_NUMEL,
    MIN_NUMEL,
    affine_fake_quant,
    applies,
    lsq_fake_quant,
    per_tensor_fake_quant,
    set_enabled,
    symmetric_fake_quant,
)

__all__ = [
    "EAGER_MIN_NUMEL",
    "MIN_NUMEL",
    "affine_fake_quant",
    "applies",
    "build",
    "load",
    "lsq_fake_quant",
    "ops",
    "per_tensor_fake_quant",
    "set_enabled",
    "symmetric_fake_quant",
]
