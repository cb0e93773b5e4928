"""Every registered quantizer declares its integer grid for export (``export_grid``), or says why it has none."""

import pytest
import torch

from lightning_quant.export.grid import grid_codes
from lightning_quant.quantizers import QUANTIZERS, Quantizer, QuantizerConfig, build_quantizer
from lightning_quant.quantizers.binary import BinaryQuantizer, TernaryQuantizer
from lightning_quant.quantizers.grid import IntegerGrid, NoIntegerGrid

CHANNELS = 6


def _bits(qcls: type) -> int:
    if issubclass(qcls, TernaryQuantizer):
        return 2
    return 1 if issubclass(qcls, BinaryQuantizer) else 4


def _cases(qcls: type) -> list[tuple[str, str, torch.Tensor]]:
    """(role, granularity, data) for each role the class takes: signed and non-negative activations, and
    per-channel weights where the class allows them."""
    torch.manual_seed(0)
    x = torch.randn(CHANNELS, 20) * 3
    cases = []
    for role in qcls.roles:
        granularity = "per_token" if "per_token" in qcls.granularities else "per_tensor"
        cases.append((role, granularity, x))
        if role == "activation":
            cases.append((role, granularity, x.relu()))
        elif "per_channel" in qcls.granularities:
            cases.append((role, "per_channel", x))
    return cases


@pytest.mark.parametrize("method", sorted(QUANTIZERS))
def test_every_registered_quantizer_reports_its_integer_grid_or_why_not(method):
    """A reported grid reproduces the quantizer's own output (what export relies on); a refusal names the class."""
    qcls = QUANTIZERS[method].handler
    declared = [c for c in qcls.__mro__ if "export_grid" in vars(c)]
    assert declared[0] is not Quantizer, f"{qcls.__name__} inherits Quantizer.export_grid: declare its grid"
    for role, granularity, x in _cases(qcls):
        cfg = QuantizerConfig(method=method, bits=_bits(qcls), granularity=granularity)
        q = build_quantizer(cfg, role, CHANNELS if granularity == "per_channel" else 1)
        q(x)  # initialised from the data
        q.eval()
        with torch.no_grad():
            expected = q(x)
        grid = q.export_grid()
        if isinstance(grid, NoIntegerGrid):
            assert qcls.__name__ in grid.reason and len(grid.reason) > 40, grid.reason
            continue
        assert isinstance(grid, IntegerGrid), type(grid)
        assert grid.qmin < grid.qmax and grid.fits_8bit()
        assert grid.zero_point.dtype == torch.int32 and bool((grid.scale > 0).all())
        assert grid.axis == (None if granularity == "per_tensor" else q.axis)
        shape = [1] * x.dim()
        if grid.axis is not None:
            shape[grid.axis] = -1
        codes = grid_codes(x, grid)
        assert torch.equal(codes, codes.round()) and codes.min() >= grid.qmin and codes.max() <= grid.qmax
        got = (codes - grid.zero_point.reshape(shape)) * grid.scale.reshape(shape)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"{method} {role} {granularity}")


def test_export_grid_reasons_reach_the_export_error():
    """What a quantizer gives as its reason is what export says, after the layer name."""
    from lightning_quant.export import ExportError
    from lightning_quant.export.grid import integer_grid

    q = build_quantizer(QuantizerConfig(method="lsq", bits=4, learn_offset=True), "activation")
    q(torch.randn(4, 8))
    with pytest.raises(ExportError, match=r"^'net\.0\.input_quantizer': LSQQuantizer \(LSQ\+\) learned a real-valued"):
        integer_grid(q, "net.0.input_quantizer")
    grouped = build_quantizer(QuantizerConfig(bits=4, granularity="per_group", group_size=4), "weight", 2)
    grouped(torch.randn(1, 8))
    assert grouped.export_grid().group_size == 4  # a per-group grid: exported for Linear weights only
    with pytest.raises(ExportError, match="per-group grids"):
        integer_grid(grouped, "net.0.weight_quantizer")
