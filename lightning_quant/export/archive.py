"""``torch.export`` archives (``.pt2``, ``.packed``): saved without pickles, checked before they are loaded.

:func:`save_program` writes a program so that :func:`check_archive` accepts it. :func:`check_archive` refuses
anything ``torch.export.load`` would unpickle or evaluate beyond integer shape arithmetic, and :func:`check_ops`
refuses a loaded graph that calls operators outside the allowed namespaces.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import torch

from lightning_quant.export.errors import ExportError


def save_program(program: Any, path: Union[str, Path]) -> Path:
    """Save a ``torch.export`` program so that :func:`check_archive` accepts it: no per-node source traces, no
    example inputs (pickled by ``torch.export.save``), JSON entries compressed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for node in program.graph.nodes:
        for key in ("stack_trace", "torch_fn", "source_fn_stack", "nn_module_stack"):
            node.meta.pop(key, None)
    program.example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            deflate = info.filename.endswith(".json")
            target.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    return path


_ENTRY = re.compile(
    r"[^/]+/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/(model_weights_config\.json|weight_\d+)|data/constants/(model_constants_config\.json|tensor_\d+)"
    r"|data/sample_inputs/model\.pt)"
)


def check_archive(path: Union[str, Path], what: str = "a packed model") -> None:
    """Refuse an archive that ``torch.export.load`` would unpickle from (pickled tensors or objects, example
    inputs), or that holds anything else than one program's graph and raw tensors (e.g. compiled libraries).
    ``what`` names the kind of file in the errors."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportError(f"{str(path)!r} is not {what} (a torch.export archive): {err}") from err
    with archive:
        names = archive.namelist()
        if len(set(names)) != len(names):
            raise ExportError(f"{str(path)!r}: repeated entry names are not allowed in {what}")
        for info in archive.infolist():
            if not _ENTRY.fullmatch(info.filename):
                raise ExportError(f"{str(path)!r}: entry {info.filename!r} is not allowed in {what}")
            if info.file_size > 64 * info.compress_size + (1 << 20):
                raise ExportError(f"{str(path)!r}: entry {info.filename!r} expands {info.file_size} bytes, not allowed")
        for name in names:
            if name.endswith("_config.json"):
                config = json.loads(archive.read(name))
                entries = config.get("config") if isinstance(config, dict) else None
                if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
                    raise ExportError(f"{str(path)!r}: {name!r} is not a tensor index, which is not allowed")
                for key, entry in entries.items():
                    if entry.get("use_pickle", True) is not False or not str(entry.get("path_name", "")).startswith(
                        ("weight_", "tensor_")
                    ):
                        raise ExportError(f"{str(path)!r}: {key!r} is a pickled object, which is not allowed")
            elif name.endswith(".pt") and archive.getinfo(name).file_size:  # save_packed leaves it empty
                raise ExportError(f"{str(path)!r}: {name!r} holds pickled objects, which are not allowed")
            elif name.endswith("models/model.json"):
                for expr in _shape_expressions(json.loads(archive.read(name))):
                    if not _is_shape_expression(expr):
                        raise ExportError(f"{str(path)!r}: shape expression {expr[:80]!r} is not allowed in {what}")


# torch.export.load evaluates each symbolic shape's ``expr_str`` with sympy.sympify, i.e. Python's eval: only
# sympy's own srepr of integer shape arithmetic is let through (these names, quoted symbol names, numbers).
_SHAPE_NAMES = frozenset(
    {
        "Symbol",
        "Integer",
        "Rational",
        "Mul",
        "Add",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "FloorDiv",
        "CeilDiv",
        "CleanDiv",
        "PythonMod",
        "IntTrueDiv",
        "FloatTrueDiv",
        "PowByNatural",
        "ModularIndexing",
        "TruncToInt",
        "RoundToInt",
        "FloorToInt",
        "CeilToInt",
        "ToFloat",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "true",
        "false",
        "True",
        "False",
        "positive",
        "integer",
        "nonnegative",
        "negative",
        "real",
        "finite",
    }
)
_QUOTED_SYMBOL = re.compile(r"'[A-Za-z]{1,8}\d{0,9}'")
_SHAPE_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def _shape_expressions(node: Any) -> Iterator[str]:
    """Every ``expr_str`` in a serialized program's JSON, at any depth."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    yield value if isinstance(value, str) else repr(value)
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _is_shape_expression(expr: str) -> bool:
    """True for sympy srepr text of shape arithmetic (``Mul(Symbol('s0', positive=True, integer=True), ...)``)."""
    if len(expr) > 10_000 or "__" in expr:
        return False
    bare = _QUOTED_SYMBOL.sub("0", expr)
    if not re.fullmatch(r"[\w\s(),=+\-*/]*", bare):
        return False
    return all(word in _SHAPE_NAMES or re.fullmatch(r"[su]\d+", word) for word in _SHAPE_IDENTIFIER.findall(bare))


def check_ops(
    program: Any, path: Union[str, Path], namespaces: tuple[str, ...] = ("aten",), what: str = "a packed model"
) -> None:
    """Refuse a loaded program whose graph calls anything but operators of ``namespaces`` and Python's ``operator``."""
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        known = isinstance(target, torch._ops.OpOverload) and target.namespace in namespaces
        if not known and getattr(target, "__module__", None) != "_operator":
            raise ExportError(f"{str(path)!r}: the graph calls {target!r}, which is not allowed in {what}")
