"""The one entry point: :func:`export` writes a model in the format its file suffix (or ``format``) names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from lightning_quant.export.errors import ExportError
from lightning_quant.export.onnx_graph import export_onnx
from lightning_quant.export.packed import save_packed
from lightning_quant.export.program import export_torch

FORMATS = ("onnx", "torch", "packed")


def export(
    model: nn.Module,
    example_input: Any,
    path: Union[str, Path],
    format: Optional[str] = None,
    int4_weights: bool = False,
) -> Path:
    """Export a quantized model to ``path`` in ``format`` (``onnx``, ``torch`` or ``packed``; default: from the
    suffix .onnx/.pt2/.packed); see :mod:`lightning_quant.export`. ``int4_weights`` (ONNX only) stores weights of
    4 bits and fewer as INT4 (see :func:`export_onnx`). The file appears only once it is complete."""
    format = format_for(path, format)
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is not supported; allowed: {list(FORMATS)}")
    if int4_weights and format != "onnx":
        raise ExportError(f"int4_weights applies to format='onnx' only, not {format!r}")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")  # written first, renamed when complete
    was_training = model.training
    model.eval()
    try:
        if format == "onnx":
            export_onnx(model, example_input, partial, int4_weights=int4_weights)
        elif format == "torch":
            export_torch(model, example_input, partial)
        else:
            save_packed(model, example_input, partial)
        partial.replace(path)
    finally:
        model.train(was_training)
        partial.unlink(missing_ok=True)
    return path


def format_for(path: Union[str, Path], format: Optional[str] = None) -> str:
    """The export format: ``format`` if given, else from the file suffix (.onnx, .pt2, .packed/.pt)."""
    if format is not None:
        return format
    suffix = Path(path).suffix
    by_suffix = {".onnx": "onnx", ".pt2": "torch", ".packed": "packed", ".pt": "packed"}
    if suffix not in by_suffix:
        raise ExportError(f"cannot tell the export format of {str(path)!r}; use .onnx, .pt2 or .packed, or name it")
    return by_suffix[suffix]
