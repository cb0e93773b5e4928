"""A module whose state may be absent from a state dict (loading a float checkpoint into a quantized model)."""

from __future__ import annotations

from typing import Any

from torch import nn


class OptionalStateModule(nn.Module):
    """If none of this module's own keys is in the state dict being loaded, keep the current state quietly.

    Used by quantizers and observers: a float checkpoint loads into a quantized model, and a Lightning
    checkpoint whose quantizer state travels under its own key is restored by the callback afterwards.
    A partially present state still reports the missing keys.
    """

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        own = [prefix + n for n, _ in self.named_parameters(recurse=False)]
        own += [prefix + n for n, _ in self.named_buffers(recurse=False)]
        report_missing = missing_keys if any(k in state_dict for k in own) else []
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, report_missing, unexpected_keys, error_msgs
        )
        self._after_load()

    def _after_load(self) -> None:
        """Refresh Python-side caches of buffer values (hook for subclasses)."""
