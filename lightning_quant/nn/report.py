"""What model surgery reports: one row per considered layer, warnings, and the name-glob helpers it shares."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from torch import nn


class LayerSelectionError(ValueError):
    """A ``layers`` setting that cannot apply to the model at hand (e.g. a name glob that matches no module)."""


@dataclass
class LayerReport:
    """One row of the surgery summary."""

    name: str
    type: str
    status: str  # quantized, float, folded
    weight_bits: Optional[int] = None
    activation_bits: Optional[int] = None
    method: str = ""
    reason: str = ""


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` did, layer by layer, with warnings for what it could not handle."""

    layers: list[LayerReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "quantized"]

    def table(self) -> str:
        """Plain-text table of every considered layer."""
        head = ("layer", "type", "status", "W bits", "A bits", "method", "note")
        rows = [
            (
                r.name,
                r.type,
                r.status,
                "-" if r.weight_bits is None else str(r.weight_bits),
                "-" if r.activation_bits is None else str(r.activation_bits),
                r.method,
                r.reason,
            )
            for r in self.layers
        ]
        return format_table(head, rows)


def format_table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Left-aligned plain-text table with a header rule."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)])


def clean_name(name: str) -> str:
    """Module name without ``torch.compile``'s ``_orig_mod`` segments, as users write it in globs."""
    return ".".join(p for p in name.split(".") if p != "_orig_mod")


def matches(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` matches any of the globs (case-sensitive, as module names are)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_globs(model: nn.Module, globs: dict[str, list[str]]) -> None:
    """Refuse any name glob that matches no module of ``model``: a typo would otherwise be ignored silently.

    ``globs`` maps the recipe key (``layers.quantize_outputs``, ...) to its globs.
    """
    names = [n for n in (clean_name(raw) for raw, _ in model.named_modules()) if n]
    for key, patterns in globs.items():
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise LayerSelectionError(
                    f"{key}: the glob {pattern!r} matches no module of {type(model).__name__}; "
                    f"module names are dotted paths such as: {shown}"
                )
