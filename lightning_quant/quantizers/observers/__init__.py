"""Range observers: estimate ``[min, max]`` per quantization group from the tensors they see.

``base`` holds the :class:`Observer` class, ``simple`` the min-max, EMA and percentile observers, ``search`` the
MSE and KL (histogram) ones that search for a clip. Usage::

    obs = build_observer("ema", num_groups=1)
    obs(x.reshape(1, -1))
    lo, hi = obs.min_val, obs.max_val
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_quant.quantizers.observers.base import Observer
from lightning_quant.quantizers.observers.search import HistogramObserver, MSEObserver, kl_divergences
from lightning_quant.quantizers.observers.simple import EMAObserver, MinMaxObserver, PercentileObserver

__all__ = [
    "EMAObserver",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "build_observer",
    "kl_divergences",
    "observer_names",
]

_OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": HistogramObserver,
}


def observer_names() -> list[str]:
    """Names accepted by :func:`build_observer` (and by recipes' ``observer`` key)."""
    return sorted(_OBSERVERS)


def build_observer(
    name: str,
    num_groups: int = 1,
    *,
    bits: int = 8,
    signed: bool = True,
    momentum: float = 0.01,
    percentile: float = 99.99,
    symmetric: bool = False,
) -> Observer:
    """Create the observer registered under ``name`` with the options that apply to it."""
    if name not in _OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; allowed: {observer_names()}")
    if name == "ema":
        return EMAObserver(num_groups, momentum=momentum)
    if name == "percentile":
        return PercentileObserver(num_groups, percentile=percentile)
    if name == "mse":
        return MSEObserver(num_groups, bits=bits, signed=signed, symmetric=symmetric)
    if name == "kl":
        return HistogramObserver(num_groups, bits=bits, signed=signed)
    return _OBSERVERS[name](num_groups)
