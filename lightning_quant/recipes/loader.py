"""Finding, reading and merging recipes: shipped names or paths, the ``base`` chain, ``key=value`` overrides.

Every value keeps the name of the file (or override) it came from, so an error names where to fix it.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig

from lightning_quant.recipes.checks import validate_recipe
from lightning_quant.recipes.convert import METHOD_SECTIONS, join, plain, to_typed
from lightning_quant.recipes.safe_yaml import parse_yaml, read_yaml_file
from lightning_quant.recipes.schema import Recipe, RecipeError, refuse

RecipeLike = Union[str, Path, dict, DictConfig, Recipe]
Overrides = Union[str, Sequence[str], None]

MAX_BASE_CHAIN = 16
MAX_OVERRIDE_CHARS = 10_000
_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[0-9]+\])*)|([0-9]+)")


@functools.cache
def recipes_dir() -> Path:
    """Folder of the shipped recipes: inside the installed wheel, or ``recipes/`` of a source checkout."""
    packaged = Path(str(resources.files("lightning_quant"))) / "_recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "recipes"


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def describe_recipes() -> dict[str, str]:
    """Shipped recipe name -> its one-line description (derived ones say what they change)."""
    return {name: load_recipe(name).description for name in list_recipes()}


def recipe_methods(recipe: Recipe) -> list[tuple[str, str, str]]:
    """``(key path, method name, file defining it)`` for each method the recipe selects (weights, activations, ptq)."""
    found = []
    for key in ("weights", "activations", "ptq"):
        section = getattr(recipe, key)
        selector, registry = METHOD_SECTIONS[type(section)]
        name = getattr(section, selector)
        found.append((f"{key}.{selector}", name, registry[name].file))
    return found


def override_list(overrides: Overrides) -> list[str]:
    """``overrides`` as a list: one string is one override. Other types pass through for :func:`load_recipe`."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, (list, tuple)):
        return list(overrides)
    return [overrides]  # type: ignore[list-item]  # refused by load_recipe with its type


def _find(ref: str, relative_to: Optional[Path], referrer: str) -> Path:
    """The file for a recipe name or path; ``referrer`` is the file whose ``base:`` names it ("" at the top)."""
    candidates = [relative_to / ref] if relative_to is not None else []
    candidates += [Path(ref), recipes_dir() / f"{ref}.yaml"]
    for path in candidates:
        try:
            if path.suffix in (".yaml", ".yml") and path.is_file():
                return path
        except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte
            continue
    names = list_recipes()
    close = [repr(c) for c in difflib.get_close_matches(Path(ref).stem, names, n=3, cutoff=0.6)]
    listed = f"`lightning-quant recipes` lists all {len(names)}"
    if close:
        hint = f"did you mean {', '.join(close[:-1]) + ' or ' if len(close) > 1 else ''}{close[-1]}? {listed}"
    else:
        hint = f"give a path to a .yaml file or a shipped recipe name ({listed})"
    what = f"{referrer}: base={ref!r}: recipe" if referrer else f"recipe {ref!r}"
    raise RecipeError(f"{what} not found; {hint}")


class _Origins:
    """Key path -> the file or override that set it (the longest recorded prefix answers)."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.by_path: dict[str, str] = {}
        self.order: dict[str, int] = {}  # key path -> when it was last set (for keys a later method change drops)
        self.clock = 0

    def __call__(self, path: str) -> str:
        while path:
            if path in self.by_path:
                return self.by_path[path]
            path = re.sub(r"(\.[^.\[]+|\[[0-9]+\])$", "", path) if re.search(r"[.\[]", path) else ""
        return self.default

    def record(self, path: str, value: Any, label: str) -> None:
        if path in self.by_path:  # a replaced value: forget where its old parts came from
            old = [k for k in self.by_path if k.startswith(path) and k[len(path) : len(path) + 1] in ("", ".", "[")]
            for key in old:
                del self.by_path[key]
        self._walk(path, value, label)

    def set_before(self, key: str, other: str) -> bool:
        """True when ``key`` was set by an earlier source than the one that last set ``other`` (a base recipe's
        observer keys, say, before an override changed ``weights.method``)."""
        if key not in self.order or other not in self.order:
            return False
        return self(key) != self(other) and self.order[key] < self.order[other]

    def _walk(self, path: str, value: Any, label: str) -> None:
        self.by_path[path] = label
        self.clock += 1
        self.order[path] = self.clock
        if isinstance(value, dict):
            for k, v in value.items():
                self._walk(join(path, k), v, label)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self._walk(f"{path}[{i}]", v, label)


def _merge(dst: dict[str, Any], src: dict[str, Any], path: str, origins: _Origins, label: str) -> None:
    """Deep merge: mappings merge key by key, anything else (lists included) replaces."""
    for key, value in src.items():
        sub = join(path, key)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            origins.by_path[sub] = label
            _merge(dst[key], value, sub, origins, label)
        else:
            dst[key] = copy.deepcopy(value)
            origins.record(sub, value, label)


def _top_level(data: Any, source: str) -> dict[str, Any]:
    data = plain(data, "", lambda _: source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise RecipeError(f"{source}: a recipe must be a mapping of keys (description, weights, ...), got {kind}")
    data.pop("source", None)
    return data


def _chain(data: dict[str, Any], source: str, seen: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """The recipe and its ``base`` ancestors, oldest first."""
    base = data.get("base")
    if base is None:
        return [(data, source)]
    if not isinstance(base, str) or not base.strip():
        raise refuse(lambda _: source, "base", base, "a shipped recipe name or a path to a .yaml file is expected")
    if base in seen:
        cycle = " -> ".join((*seen, base))
        raise RecipeError(f"{source}: base={base!r}: recipes extend each other in a cycle: {cycle}")
    if len(seen) >= MAX_BASE_CHAIN:
        raise RecipeError(f"{source}: base={base!r}: more than {MAX_BASE_CHAIN} recipes extend each other")
    folder = Path(source).parent if source.endswith((".yaml", ".yml")) else None
    path = _find(base, folder, source)
    parent = _top_level(read_yaml_file(path), str(path))
    return [*_chain(parent, str(path), (*seen, base)), (data, source)]


def _split_override(item: str, source: str) -> tuple[list[Union[str, int]], str, Any]:
    label = f"{source}: override {item[:200]!r}"
    key, _, text = item.partition("=")
    key = key.strip()
    segments: list[Union[str, int]] = []
    for part in key.split("."):
        match = _SEGMENT.fullmatch(part)
        if match is None:
            raise RecipeError(
                f"{label}: {key!r} is not a key path; write key.path=value, e.g. weights.bits=4 or "
                "layers.overrides[0].skip=true"
            )
        if match.group(3) is not None:
            segments.append(int(match.group(3)))
        else:
            segments.append(match.group(1))
            segments += [int(i) for i in re.findall(r"[0-9]+", match.group(2))]
    if segments[0] in ("base", "source"):
        raise RecipeError(f"{label}: {segments[0]} cannot be overridden; load that recipe, or write a file with base:")
    path = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in segments).lstrip(".")
    value = plain(parse_yaml(text, f"{label}: the value of {path}"), path, lambda _: label)
    return segments, path, value


def _no_entry(label: str, walked: str, node: Any) -> RecipeError:
    size = len(node) if isinstance(node, list) else 0 if node == {} else None
    state = "is not a list" if size is None else f"has {size} entries"
    return RecipeError(f"{label}: {walked} {state}; set the whole list instead, e.g. {walked}=[...]")


def _apply_override(merged: dict[str, Any], item: Any, source: str, origins: _Origins) -> None:
    if not isinstance(item, str):
        raise refuse(lambda _: source, "overrides item", item, "overrides are 'key.path=value' strings")
    if len(item) > MAX_OVERRIDE_CHARS:
        raise RecipeError(f"{source}: an override of {len(item)} characters is refused (at most {MAX_OVERRIDE_CHARS})")
    if "=" not in item:
        raise RecipeError(f"{source}: override {item!r} must look like key.path=value, e.g. weights.bits=4")
    segments, path, value = _split_override(item, source)
    label = f"{source}: override {item[:200]!r}"
    node: Any = merged
    walked = ""
    for seg in segments[:-1]:
        if isinstance(seg, int):
            if not isinstance(node, list) or seg >= len(node):
                raise _no_entry(label, walked, node)
            node, walked = node[seg], f"{walked}[{seg}]"
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"{label}: {walked}={node!r} is not a mapping, so it has no key {seg!r}")
        node, walked = node.setdefault(seg, {}), join(walked, seg)
    last = segments[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise _no_entry(label, walked, node)
        node[last] = value
        origins.record(path, value, label)
    elif not isinstance(node, dict):
        raise RecipeError(f"{label}: {walked}={node!r} is not a mapping, so it has no key {last!r}")
    elif isinstance(value, dict) and isinstance(node.get(last), dict):
        _merge(node[last], value, path, origins, label)
    else:
        node[last] = value
        origins.record(path, value, label)


def _derived_description(own: dict[str, Any], base: str) -> str:
    """What a derived recipe without its own description is: its base and the keys it changes."""
    changes: list[str] = []

    def walk(path: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(join(path, k), v)
        else:
            changes.append(f"{path}={value}")

    walk("", {k: v for k, v in own.items() if k not in ("base", "name", "description")})
    text = f"{base} with {', '.join(changes)}" if changes else f"same as {base}"
    return text if len(text) <= 200 else text[:197] + "..."


def load_recipe(recipe: RecipeLike, overrides: Overrides = None) -> Recipe:
    """Load, merge (``base`` chain, then ``overrides``) and validate a recipe.

    ``recipe`` is a shipped name (``"lsq_w4a4"``), a path to a YAML file, a dict/``DictConfig`` or a
    :class:`Recipe`. ``overrides`` are ``"key.path=value"`` strings (one string is one override).
    Raises :class:`RecipeError` naming the file and the key's full path.
    """
    if isinstance(recipe, Recipe):
        source = recipe.source or "<Recipe>"
        layers = [(_top_level(recipe, source), source)]
    elif isinstance(recipe, (dict, DictConfig)):
        source = "<dict>"
        layers = _chain(_top_level(recipe, source), source)
    elif isinstance(recipe, (str, Path)):
        path = _find(str(recipe), None, "")
        source = str(path)
        layers = _chain(_top_level(read_yaml_file(path), source), source)
    else:
        raise RecipeError(f"recipe={recipe!r}: give a shipped recipe name, a .yaml path, a dict or a Recipe")
    origins = _Origins(source)
    merged: dict[str, Any] = {}
    for data, src in layers:
        _merge(merged, data, "", origins, src)
    own = layers[-1][0]
    if "description" not in own and own.get("base") is not None:
        merged["description"] = _derived_description(own, str(own["base"]))
        origins.by_path["description"] = source
    items = override_list(overrides)
    for item in items:
        _apply_override(merged, item, source, origins)
    if "description" not in merged:
        raise RecipeError(f"{source}: key 'description' is required (one line saying what the recipe does)")
    result: Recipe = to_typed(Recipe, merged, "", origins)
    result.source = source
    if not result.name:
        result.name = Path(source).stem if source.endswith((".yaml", ".yml")) else "custom"
    shown = [i for i in items if i.split("=", 1)[0].strip() != "description"]
    if shown:
        result.description += f" (overrides: {', '.join(shown)})"
    validate_recipe(result, origins)
    return result
