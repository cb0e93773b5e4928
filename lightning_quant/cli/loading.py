"""What the ``lightning-quant`` command reads from outside: user classes (module path or file), checkpoints and
cached baselines (tensors only, never pickled objects), and the key under which a float baseline is cached."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Optional

import torch


def module_from_file(file: Path) -> Any:
    """Import a Python file as a module named after it (its folder goes on ``sys.path`` for its own imports)."""
    folder = str(file.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # a file named like a loaded module (types.py, copy.py) must not replace it for the whole process
    name = file.stem if file.stem not in sys.modules else f"_lightning_quant_user_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"{file} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource finds the module by name
    spec.loader.exec_module(module)
    return module


def import_object(path: str, what: str) -> Any:
    """Import ``package.module:Name``, ``package.module.Name`` or ``path/to/file.py:Name``.

    The working directory comes first on ``sys.path``, as with ``python -m``, so a module next to the user
    imports without ``PYTHONPATH=.``.
    """
    target, sep, attr = path.rpartition(":")
    if not sep:
        target, _, attr = path.rpartition(".")
    usage = "use 'mypkg.module:ClassName' or 'path/to/file.py:ClassName'"
    if not target or not attr:
        raise SystemExit(f"error: --{what} {path!r} names no class; {usage}")
    try:
        if target.endswith(".py") or "/" in target or os.sep in target:
            if not Path(target).is_file():
                raise SystemExit(f"error: --{what} {path!r}: there is no file {target!r}; {usage}")
            module = module_from_file(Path(target))
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
        found = getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise SystemExit(f"error: --{what} {path!r} could not be imported ({err}); {usage}") from err
    if not callable(found):
        raise SystemExit(f"error: --{what} {path!r} is a {type(found).__name__}, not a class; {usage}")
    return found


def load_tensors(path: Path, what: str) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, numbers, strings and plain containers only, so that a
    hostile file cannot run code. Anything else is refused with an error that names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {what} {str(path)!r} does not exist") from err
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        refused = f" ({found.group(1)})" if found else ""
        raise SystemExit(
            f"error: {what} {str(path)!r} holds objects that are not allowed{refused}: only tensors, numbers, "
            "strings and plain containers are loaded (weights_only=True). It was not loaded; nothing in it ran."
        ) from err


def _source_of(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):  # defined interactively or compiled: the name is all there is
        return cls.__qualname__


def baseline_key(model: torch.nn.Module, datamodule: Any) -> str:
    """A short hash of what the float baseline depends on: the model's module tree, parameter shapes and
    hyperparameters, and the source of every user class in it (model, its layers and their bases, data module).

    Editing the model's code or structure thus trains a new baseline instead of loading a stale one."""
    digest = hashlib.sha256()
    digest.update(repr(model).encode())
    digest.update(repr(dict(getattr(model, "hparams", {}))).encode())
    for key, value in model.state_dict().items():
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
    digest.update(repr(getattr(datamodule, "batch_size", None)).encode())
    classes = {c for m in model.modules() for c in type(m).__mro__} | set(type(datamodule).__mro__)
    library = ("builtins", "torch", "lightning", "pytorch_lightning", "torchmetrics", "typing", "abc")
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        if cls.__module__.split(".")[0] not in library:
            digest.update(f"{cls.__module__}.{cls.__qualname__}\n{_source_of(cls)}".encode())
    return digest.hexdigest()[:12]


def stored_recipe(checkpoint: dict[str, Any]) -> Optional[str]:
    """The recipe YAML a callback stored in the checkpoint (QAT/PTQ/binary under ``lightning_quant``, INQ in its
    callback state)."""
    saved = checkpoint.get("lightning_quant")
    if isinstance(saved, dict) and isinstance(saved.get("recipe"), str):
        return saved["recipe"]
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and isinstance(state.get("recipe"), str):
            return state["recipe"]
    return None
