"""The blocks that LLM methods (GPTQ, Norm Tweaking) process in order: transformer layers and the layers between.

The ``blocks`` option names the module whose children are the blocks (``model.model.layers``); left unset,
the blocks are found on the module tree as for BRECQ (:func:`~lightning_quant.ptq.units.find_units`).
"""

from __future__ import annotations

from torch import nn

from lightning_quant.ptq.settings import BlockOptions, PTQConfig
from lightning_quant.ptq.units import Unit, find_units


def transformer_units(model: nn.Module, cfg: PTQConfig) -> list[Unit]:
    """Blocks for LLM methods: the children of the options' ``blocks`` (a module name) if set, else found."""
    blocks = cfg.options.blocks if isinstance(cfg.options, BlockOptions) else None
    if blocks is None:
        return find_units(model, blocks=True)
    try:
        holder = model.get_submodule(blocks)
    except AttributeError as err:
        raise ValueError(f"ptq.blocks={blocks!r}: the model has no such module") from err
    inside = {id(m) for m in holder.modules()}
    units = [Unit(f"{blocks}.{name}", [child]) for name, child in holder.named_children()]
    units += [u for u in find_units(model, blocks=False) if id(u.modules[0]) not in inside]
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(units, key=lambda u: order[id(u.modules[0])])
