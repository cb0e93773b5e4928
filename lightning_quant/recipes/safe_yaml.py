"""Bounded YAML reading for recipes: plain data only, with limits on size, nesting and alias expansion.

PyYAML's safe loader already refuses Python tags, but it accepts duplicate keys (the last wins), nesting
deep enough to exhaust the interpreter's stack, and alias "bombs" whose expanded size grows exponentially.
This loader refuses all three, and every failure is a :class:`RecipeError` naming the source.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lightning_quant.recipes.schema import RecipeError

MAX_FILE_BYTES = 64 * 1024  # shipped recipes are under 2 KB
MAX_DEPTH = 32  # nesting of mappings and lists (a recipe needs 4)
MAX_NODES = 5000  # values after expanding aliases (a recipe has about 100)


class _BoundedLoader(yaml.SafeLoader):
    """Safe loader that counts nested and alias-expanded nodes and refuses duplicate keys."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.path: list[str] = []
        self.expanded: dict[int, int] = {}  # id(node) -> number of nodes it stands for, aliases expanded

    def _where(self, node: Node) -> str:
        key = "".join(self.path).lstrip(".")
        line = f"line {node.start_mark.line + 1}"
        return f"{self.source}: {key} ({line})" if key else f"{self.source}: {line}"

    def compose_node(self, parent: Any, index: Any) -> Any:
        segment = f".{index.value}" if isinstance(index, ScalarNode) else f"[{index}]" if isinstance(index, int) else ""
        self.path.append(segment)
        try:
            if len(self.path) > MAX_DEPTH:
                raise RecipeError(
                    f"{self._where(self.peek_event())}: nested more than {MAX_DEPTH} levels deep; a recipe is a "
                    "mapping of sections with plain values and lists"
                )
            if self.check_event(yaml.AliasEvent):
                anchor = self.peek_event().anchor
                if anchor in self.anchors and id(self.anchors[anchor]) not in self.expanded:
                    raise RecipeError(f"{self._where(self.peek_event())}: alias *{anchor} refers to itself")
            node = super().compose_node(parent, index)
            self._count(node)
            return node
        finally:
            self.path.pop()

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                self.path.append(f".{key_node.value}")
                where = self._where(key_node)
                self.path.pop()
                raise RecipeError(f"{where}: duplicate key {key_node.value!r} in one mapping; give each key once")
            seen.add(key)
        return node

    def _count(self, node: Node) -> None:
        if id(node) in self.expanded:
            return
        size = 1
        if isinstance(node, SequenceNode):
            size += sum(self.expanded.get(id(item), 1) for item in node.value)
        elif isinstance(node, MappingNode):
            size += sum(self.expanded.get(id(k), 1) + self.expanded.get(id(v), 1) for k, v in node.value)
        if size > MAX_NODES:
            raise RecipeError(
                f"{self._where(node)}: more than {MAX_NODES} values once aliases (*name) are expanded; a recipe "
                "this large is refused (alias expansion grows exponentially)"
            )
        self.expanded[id(node)] = size


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text into plain data (dicts, lists, strings, numbers, booleans, None)."""
    if "\x00" in text:
        raise RecipeError(f"{source}: contains NUL characters; save the recipe as UTF-8 text (not UTF-16)")
    loader = _BoundedLoader(text, source)
    try:
        return loader.get_single_data()
    except RecipeError:
        raise
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        allowed = "only plain values, lists and mappings are allowed"
        raise RecipeError(f"{source}: not valid YAML ({allowed}): {detail}") from err
    except (ValueError, TypeError, RecursionError) as err:  # e.g. an impossible date such as 2020-13-45
        raise RecipeError(f"{source}: not valid YAML: {type(err).__name__}: {err}") from err
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> Any:
    """Read a recipe file: at most :data:`MAX_FILE_BYTES`, UTF-8, then :func:`parse_yaml` (cached while unchanged)."""
    stat = path.stat()
    return copy.deepcopy(_read_cached(str(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=256)
def _read_cached(name: str, mtime_ns: int, size: int) -> Any:
    path = Path(name)
    with path.open("rb") as fh:
        raw = fh.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB; a recipe is a short YAML file")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError(f"{path}: UTF-16 text; save the recipe as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); save the recipe as UTF-8"
        ) from err
    return parse_yaml(text, str(path))
