"""The PyTorch int8 format: a ``torch.export`` program of the deployed model, its FX rewrites, and its compiler.

:func:`export_torch` traces the deployed model (torch's ``quantized_decomposed`` ops, what torchao's pt2e
``convert_pt2e`` produces) and rewrites its graph as the ONNX path does; :func:`compile_int8` lowers it with
inductor and freezing, whose x86 passes replace the patterns by oneDNN int8 convolutions and matmuls;
:func:`load_program` loads a saved ``.pt2`` after checking it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed: .pt2 files load)
from torch import nn

from lightning_quant.export.archive import check_archive, check_ops, save_program
from lightning_quant.export.errors import ExportError
from lightning_quant.export.modules import deploy_model
from lightning_quant.export.tracing import batch_of_two, cpu_args, free_dims


def export_torch(model: nn.Module, example_input: Any, path: Optional[Union[str, Path]] = None) -> Any:
    """``torch.export`` program of the int8 quantize/dequantize graph (saved with ``torch.export.save`` if ``path``).

    The batch dimension stays dynamic, even for an example batch of one (traced as a batch of two). Load the
    file with :func:`load_program`.
    """
    deployed = deploy_model(model).cpu()
    blocked = [n for n, m in deployed.named_modules() if getattr(m, "blocks", None) is not None]
    if blocked:
        raise ExportError(f"'{blocked[0]}': per-group weights have no int8 kernel in PyTorch; use format='onnx'")
    args = batch_of_two(cpu_args(example_input))
    program = torch.export.export(deployed, args, dynamic_shapes=free_dims(args))
    _propagate_qdq_fx(program.graph_module)
    _drop_requantization_fx(program.graph_module)
    if path is not None:
        save_program(program, path)
    return program


def load_program(path: Union[str, Path]) -> Any:
    """Load a ``.pt2`` program written by :func:`export` (or :func:`export_torch`); run it with
    ``load_program(path).module()(x)``, or compile it with :func:`compile_int8`.

    Plain ``torch.export.load`` works as well once ``lightning_quant`` (which registers torch's
    ``quantized_decomposed`` ops that the graph calls) is imported. Nothing is unpickled: a file holding pickled
    objects, or calling operators other than ATen's and the quantize/dequantize ones, is refused (``ExportError``).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such .pt2 file")
    check_archive(path, "a lightning-quant program")
    with open(path, "rb") as file:
        program = torch.export.load(file)
    check_ops(program, path, ("aten", "quantized_decomposed"), "a lightning-quant program")
    return program


def _propagate_qdq_fx(graph_module: torch.fx.GraphModule) -> int:
    """The ``.pt2`` counterpart of :func:`_propagate_qdq`: copy each activation quantize/dequantize pair back
    through max-pooling, flattening, reshapes and ReLU onto the conv/linear (or its ReLU) that produces the tensor.

    Exact, as in ONNX (those ops commute with a monotone rounding). Inductor then gives the conv an int8 output
    and pools in int8, as in torchao's graphs. Returns how many pairs were added.
    """
    ops, aten = torch.ops.quantized_decomposed, torch.ops.aten
    layers = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default)
    passes = (aten.relu.default, aten.max_pool2d.default, aten.flatten.using_ints, aten.view.default,
              aten.reshape.default)  # fmt: skip
    graph = graph_module.graph
    added = 0
    for q in [n for n in graph.nodes if n.target == ops.quantize_per_tensor.default]:
        node = q.args[0]
        path = []
        while isinstance(node, torch.fx.Node) and node.target in passes and len(node.users) == 1:
            path.append(node)
            node = node.args[0]
        if not path or not isinstance(node, torch.fx.Node) or node.target not in layers or len(node.users) != 1:
            continue
        anchor = path[-1] if path[-1].target == aten.relu.default else node  # conv + ReLU is one int8 kernel
        if anchor is q.args[0]:
            continue
        with graph.inserting_after(anchor):
            copy_q = graph.call_function(ops.quantize_per_tensor.default, (anchor, *q.args[1:]))
        with graph.inserting_after(copy_q):
            copy_dq = graph.call_function(ops.dequantize_per_tensor.default, (copy_q, *q.args[1:]))
        value = anchor.meta["val"]  # a fake tensor: shapes and dtypes for torch.export's verifier
        with value.fake_mode:
            copy_q.meta["val"] = ops.quantize_per_tensor.default(value, *q.args[1:])
            copy_dq.meta["val"] = ops.dequantize_per_tensor.default(copy_q.meta["val"], *q.args[1:])
        anchor.replace_all_uses_with(copy_dq, delete_user_cb=_other_than(copy_q))
        added += 1
    if added:
        graph_module.recompile()
    return added


def _drop_requantization_fx(graph_module: torch.fx.GraphModule) -> int:
    """Skip ``dequantize → quantize`` pairs with identical arguments in an exported program: they give back the
    codes they started from.

    They appear where a block's input or output quantizer meets the next layer's input quantizer on the same grid;
    inductor cannot see that the pair is the identity and spends a requantization pass over the tensor on it, and
    the pair also hides the int8 tensor from its conv + add + ReLU fusion. Returns how many were skipped.
    """
    ops = torch.ops.quantized_decomposed
    skipped = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target != ops.quantize_per_tensor.default:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.target != ops.dequantize_per_tensor.default:
            continue
        if tuple(source.args[1:]) != tuple(node.args[1:]) or source.kwargs != node.kwargs:
            continue
        node.replace_all_uses_with(source.args[0])
        skipped += 1
    if skipped:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return skipped


def _other_than(own: torch.fx.Node) -> Callable[[torch.fx.Node], bool]:
    """A ``delete_user_cb`` that rewires every user but ``own`` (the new node that reads the old one)."""
    return lambda user: user is not own


def compile_int8(program: Any, dynamic: Optional[bool] = False) -> Any:
    """Compile an exported int8 program with inductor and freezing, so that its x86 passes pick oneDNN int8 kernels.

    The module that ``program.module()`` returns checks the structure of its inputs in Python on every call
    (about 60 µs here, a sixth of the digits CNN's batch-1 latency); the compiled module guards its inputs
    itself, so that check is dropped. Each input shape is compiled once (``dynamic=False``): with symbolic
    shapes, inductor's x86 int8 convolution lowering fails a stride check in torch 2.13 at the second batch size.
    """
    module = program.module()
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del module._forward_pre_hooks[key]
    # torch.compile(module) returns an OptimizedModule, a Module; torch's stub types it as a plain Callable
    return _FrozenCompiled(torch.compile(module, dynamic=dynamic))  # type: ignore[arg-type]


class _FrozenCompiled(nn.Module):
    """A compiled int8 program that turns inductor's freezing on only while it runs (it compiles on first call,
    once per shape). Setting it globally made every later ``torch.compile`` of a training model treat parameters
    as constants and recompile at each optimizer step."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)
