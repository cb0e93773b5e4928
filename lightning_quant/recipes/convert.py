"""Plain data -> typed recipe dataclasses, with errors that name the key's full path (``layers.overrides[1].bits``).

Nothing here resolves anything: omegaconf interpolations (``${oc.env:SECRET}``) and its "missing" marker
(``???``) are refused wherever they appear, so no environment value can reach a recipe or a checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from typing import Any, TypeGuard, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_quant.ptq import ALGORITHMS, PTQConfig
from lightning_quant.quantizers import QUANTIZERS, QuantizerConfig
from lightning_quant.recipes.safe_yaml import MAX_DEPTH, MAX_NODES
from lightning_quant.recipes.schema import RecipeError, Where, flat_fields, refuse, short_repr
from lightning_quant.registry import Registry

_INT = re.compile(r"[+-]?[0-9]+")
_INT_LIMIT = 2**63  # larger integers overflow torch's int64


# Sections whose keys depend on a method: section type -> (the key naming the method, the registry of methods).
# Such a section is flat in YAML (common keys and the method's option keys side by side); in Python the method's
# keys live in its ``options`` dataclass.
METHOD_SECTIONS: dict[type, tuple[str, Registry[Any]]] = {
    QuantizerConfig: ("method", QUANTIZERS),
    PTQConfig: ("algorithm", ALGORITHMS),
}


def join(path: str, key: str) -> str:
    """``path.key`` (or ``key`` at the top)."""
    return f"{path}.{key}" if path else key


def plain(value: Any, path: str, where: Where, budget: list[int] | None = None, depth: int = 0) -> Any:
    """A copy of ``value`` as dicts with string keys, lists, strings, numbers, booleans and None.

    Refuses interpolations, ``???``, other objects, and data nested or sized past the YAML reader's limits.
    Dataclass instances and omegaconf containers (kept unresolved) become dicts and lists.
    """
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise RecipeError(f"{where(path)}: {path or 'the recipe'} is nested or sized past the recipe limits")
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = flat_fields(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecipeError(
                    f"{where(path)}: key {short_repr(key)} in {path or 'the recipe'} is not a name "
                    f"({type(key).__name__}); keys are words such as bits or method"
                )
            out[key] = plain(item, join(path, key), where, budget, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [plain(item, f"{path}[{i}]", where, budget, depth + 1) for i, item in enumerate(value)]
    if isinstance(value, str):
        if "${" in value:
            raise refuse(
                where,
                path,
                value,
                "interpolations (${...}, such as ${oc.env:VAR}) are not resolved in recipes: write the value itself",
            )
        if value == "???":
            raise refuse(where, path, value, "'???' marks a missing value: give the value")
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise refuse(where, path, value, f"a {type(value).__name__} is not a recipe value (plain YAML values only)")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> TypeGuard[type]:
    """True for a dataclass (a class: type hints never hold dataclass instances)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    if _is_dataclass_type(tp):
        return f"a mapping of {tp.__name__} keys"
    origin = typing.get_origin(tp)
    if origin is Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        if _is_dataclass_type(inner):
            return f"a list of mappings of {inner.__name__} keys"
        return f"a list of {_describe(inner).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _unknown_key(cls: type, key: str, path: str, where: Where) -> RecipeError:
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {join(path, close[0])}? " if close else ""
    where_key = join(path, key)
    section = path or "a recipe"
    allowed = ", ".join(names)
    return RecipeError(f"{where(where_key)}: {where_key} is not a recipe key; {hint}{section} takes: {allowed}")


def to_typed(tp: Any, value: Any, path: str, where: Where, default: Any = None) -> Any:
    """Convert plain ``value`` to type ``tp``; a dataclass starts from ``default`` and takes the given keys."""
    origin = typing.get_origin(tp)
    if origin is Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else to_typed(inner[0], value, path, where, default)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            keys = ", ".join(f.name for f in dataclasses.fields(tp) if f.name not in ("source", "options"))
            raise refuse(where, path, value, f"{_describe(tp)} is expected ({keys})")
        if tp in METHOD_SECTIONS:
            return _method_section(tp, value, path, where, default)
        types = _field_types(tp)
        base = default if default is not None else tp()
        changes = {}
        for key, item in value.items():
            if key not in types or key == "source":
                raise _unknown_key(tp, key, path, where)
            changes[key] = to_typed(types[key], item, join(path, key), where, getattr(base, key))
        return dataclasses.replace(base, **changes)
    if origin is list:
        if not isinstance(value, list):
            raise refuse(where, path, value, f"{_describe(tp)} is expected")
        (item_tp,) = typing.get_args(tp)
        return [to_typed(item_tp, item, f"{path}[{i}]", where) for i, item in enumerate(value)]
    return _scalar(tp, value, path, where)


def _method_section(tp: type, value: dict[str, Any], path: str, where: Where, default: Any) -> Any:
    """A flat method section: its common keys, and the selected method's option keys into ``options``."""
    selector, registry = METHOD_SECTIONS[tp]
    base = default if default is not None else tp()
    types = _field_types(tp)
    common = [f.name for f in dataclasses.fields(tp) if f.name != "options"]
    name = base_name = getattr(base, selector)
    if selector in value:
        name = to_typed(str, value[selector], join(path, selector), where)
    if name not in registry:
        raise refuse(where, join(path, selector), name, f"allowed: {registry.names()}")
    method = registry[name]
    changes = {}
    option_values = {}
    for key, item in value.items():
        if key in common:
            changes[key] = to_typed(types[key], item, join(path, key), where, getattr(base, key))
        elif key in method.option_names():
            option_values[key] = item
        elif not _dropped_by_method_change(join(path, key), join(path, selector), where):
            raise _not_of_method(key, item, path, selector, name, registry, common, where)
    start = base.options if name == base_name else method.options()
    options = to_typed(method.options, option_values, path, where, start)
    return dataclasses.replace(base, **changes, options=options)


def _dropped_by_method_change(key_path: str, method_path: str, where: Where) -> bool:
    """A key set by an earlier source than the method (a base recipe's ``weights.observer`` when an override says
    ``weights.method=lsq``) belonged to the method it replaced: it is dropped, not refused."""
    set_before = getattr(where, "set_before", None)
    return bool(set_before and set_before(key_path, method_path))


def _not_of_method(
    key: str, value: Any, path: str, selector: str, name: str, registry: Registry[Any], common: list[str], where: Where
) -> RecipeError:
    """The error for a key that is neither common to the section nor an option of its selected method ``name``."""
    key_path, method_path = join(path, key), join(path, selector)
    takes = registry[name].option_names()
    close = difflib.get_close_matches(key, [*common, *takes], n=1)
    hint = f"did you mean {join(path, close[0])}? " if close else ""
    owners = [other for other in registry.names() if key in registry[other].option_names()]
    if not owners:
        allowed = ", ".join([*common, *takes])
        return RecipeError(f"{where(key_path)}: {key_path} is not a recipe key; {hint}{path} takes: {allowed}")
    origin = where(method_path)
    note = "" if where(key_path) == origin else f" (set in {origin})"
    options = ", ".join(takes) if takes else "no options of its own"
    return RecipeError(
        f"{where(key_path)}: {key_path}={short_repr(value)} does not apply to {method_path}={name!r}{note}, only to "
        f"{', '.join(owners)}; {name} takes: {options}; every {path} section takes: {', '.join(common)}"
    )


def _scalar(tp: Any, value: Any, path: str, where: Where) -> Any:
    wanted = f"{_describe(tp)} is expected"
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise refuse(where, path, value, wanted)
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and _INT.fullmatch(value.strip()):
            value = int(value.strip())
        if not isinstance(value, int) or isinstance(value, bool):
            raise refuse(where, path, value, wanted)
        if abs(value) >= _INT_LIMIT:
            raise refuse(where, path, value, "integers must be below 2^63")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise refuse(where, path, value, wanted) from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise refuse(where, path, value, wanted)
        if not math.isfinite(value):
            raise refuse(where, path, value, "numbers must be finite (not inf or nan)")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise refuse(where, path, value, wanted)
        return str(value)
    raise RecipeError(f"{where(path)}: {path} has an unsupported schema type {tp!r}")  # a schema bug, not user input
