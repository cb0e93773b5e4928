"""Export a quantized or binarized model for real low-bit inference: ONNX QDQ, a PyTorch int8 graph, packed bits.

* ``format="onnx"``: every quantized layer becomes ``QuantizeLinear → DequantizeLinear`` on its input
  (int8/uint8, per tensor) and an int8 weight initializer with ``DequantizeLinear`` (per tensor or per
  output channel). onnxruntime fuses these pairs into integer kernels (QLinearConv, QGemm, ...). The graph
  comes from ``torch.onnx.export`` (the ``torch.export``-based exporter), with a dynamic batch dimension.
* ``format="torch"``: the same graph as a ``torch.export`` program (torch's ``quantized_decomposed`` ops,
  the representation torchao's pt2e ``convert_pt2e`` produces); :func:`compile_int8` lowers it with inductor
  and freezing, whose x86 passes replace the patterns by oneDNN int8 convolutions and matmuls.
* ``format="packed"``: binary weights stored 8 per byte (ternary ones 4 per byte) with their scales, as a
  ``torch.export`` program that unpacks them; :func:`load_packed` loads it without pickle.

Ternary (TWN/TTQ) weights are exported to ONNX and ``.pt2`` as int8 codes {-1, 0, 1} with a scale per output
channel (TTQ: one for the positive and one for the negative codes). Float Linear/Conv layers whose weights already
lie on an integer grid (after INQ) are exported weight-only: int8 (or int16) codes with DequantizeLinear, float
activations. Hooks or submodules on a quantized layer that the format does not carry make the export refuse,
naming the layer.

Only grids that the target can represent are exported; anything else raises :class:`ExportError` naming
the layer. Example::

    export(model, torch.randn(1, 1, 8, 8), "model.onnx")

Files, one concern each: ``cpu`` (the int8 saturation probe), ``grid`` (a quantizer's integer grid, checked for
the target), ``modules`` (the deploy modules that replace quantized layers), ``onnx_graph`` (ONNX export and its
graph rewrites), ``program`` (``torch.export``, its FX rewrites, :func:`compile_int8`, :func:`load_program`),
``archive`` (pickle-free saving and the checks before loading), ``packed`` (the packed binary format) and
``formats`` (:func:`export`).
"""

from lightning_quant.export.archive import check_archive, check_ops, save_program
from lightning_quant.export.cpu import int8_saturation_risk
from lightning_quant.export.errors import ExportError
from lightning_quant.export.formats import FORMATS, export, format_for
from lightning_quant.export.grid import BlockGrid, integer_grid, weight_grid_of
from lightning_quant.export.modules import (
    DeployLayer,
    GridWeightLayer,
    QuantDequant,
    check_attachments,
    deploy_model,
)
from lightning_quant.export.onnx_graph import export_onnx
from lightning_quant.export.packed import (
    PackedBinaryLayer,
    load_packed,
    pack_codes,
    pack_program,
    save_packed,
    unpack_codes,
)
from lightning_quant.export.program import compile_int8, export_torch, load_program

__all__ = [
    "FORMATS",
    "BlockGrid",
    "DeployLayer",
    "ExportError",
    "GridWeightLayer",
    "PackedBinaryLayer",
    "QuantDequant",
    "check_archive",
    "check_attachments",
    "check_ops",
    "compile_int8",
    "deploy_model",
    "export",
    "export_onnx",
    "export_torch",
    "format_for",
    "int8_saturation_risk",
    "integer_grid",
    "load_packed",
    "load_program",
    "pack_codes",
    "pack_program",
    "save_packed",
    "save_program",
    "unpack_codes",
    "weight_grid_of",
]
