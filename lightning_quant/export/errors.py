"""The error every export format raises for a model it cannot represent."""

from __future__ import annotations


class ExportError(ValueError):
    """A model (or one of its layers) that the chosen format cannot represent; the message names the layer."""
