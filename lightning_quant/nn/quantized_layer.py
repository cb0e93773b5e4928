"""The mixin every quantized layer shares: fake-quantizes the weight and the input before the float computation.

It lives apart from the layer classes so that layers defined elsewhere (``transformers``' Conv1D) can subclass it
without importing the module that looks them up.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from lightning_quant.quantizers import Quantizer


class QuantizedLayer(nn.Module):
    """Mixin for quantized layers: fake-quantizes the weight and the input before the float computation."""

    float_class: ClassVar[type[nn.Module]]
    weight_axis: ClassVar[int] = 0  # output-channel axis of the weight
    has_input: ClassVar[bool] = True
    selected_as: ClassVar[str] = ""  # the ``layers.types`` name that selects it (default: the float class name)
    weight: torch.Tensor  # the float layer's parameter
    weight_quantizer: Optional[Quantizer]
    input_quantizer: Optional[Quantizer]

    def first_call_pending(self) -> bool:
        """Under ``torch.compile``, True while a quantizer of this layer has yet to initialise from data.

        Initialisation decides Python state from the data (the code's sign, then the integer range), which would
        break the graph inside the quantizer: every function between the layer and the break would then be compiled
        on its own, once per layer that differs in a guard (rank, bits, requires_grad), until the recompile limit.
        Instead the layer's first call runs eagerly (:meth:`eager_call`); from the next step on, the whole model is
        one graph.
        """
        if not torch.compiler.is_compiling():
            return False
        found = [self._modules.get(k) for k in ("weight_quantizer", "input_quantizer", "output_quantizer")]
        return any(isinstance(q, Quantizer) and not q._initialized for q in found)

    @torch.compiler.disable
    def eager_call(self, *args: Any, **kwargs: Any) -> Any:
        """``forward`` outside ``torch.compile`` (a layer's first call, see :meth:`first_call_pending`)."""
        return self.forward(*args, **kwargs)

    def weight_to_quantize(self) -> torch.Tensor:
        """The tensor the weight quantizer receives (the weight, or the weight with a BatchNorm folded in)."""
        return self.weight

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the quantized model sees it."""
        w = self.weight_to_quantize()
        return self.weight_quantizer(w) if self.weight_quantizer is not None else w

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the quantized model sees it."""
        return self.input_quantizer(x) if self.input_quantizer is not None else x

    def quantized_output(self, y: torch.Tensor) -> torch.Tensor:
        """The output, fake-quantized if the layer has an output quantizer (recipe key ``layers.quantize_outputs``)."""
        q = self._modules.get("output_quantizer")
        return q(y) if q is not None else y

    def activation_quantizers(self) -> list[Quantizer]:
        """The input quantizer and the output quantizer, where present."""
        found = [self.input_quantizer, self._modules.get("output_quantizer")]
        return [q for q in found if isinstance(q, Quantizer)]
