"""The ``ptq`` recipe section: the settings of the post-training callback itself, plus the algorithm's options.

What only one algorithm reads (AdaRound's iterations, GPTQ's dampening, ...) lives in that algorithm's options
dataclass, next to its code; ``PTQConfig.options`` holds an instance of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from lightning_quant.registry import OptionError


@dataclass(init=False)
class PTQConfig:
    """Post-training settings (the ``ptq`` recipe section): calibration data and the algorithm to run.

    The algorithm's own keywords may be given flat, as in a recipe:
    ``PTQConfig(algorithm="qdrop", iters=200)`` sets ``options=QDropOptions(iters=200)``.
    """

    algorithm: str = "none"  # none (calibration only / RTN), adaround, brecq, qdrop, bitsplit, gptq, normtweak, ...
    num_samples: int = 1024  # calibration samples drawn from the calibration dataloader
    dataloader: str = "train"  # train or val (the datamodule's), generated (by the model itself), or auto
    generate_length: int = 128  # generated calibration data: tokens per sample ...
    generate_greedy: int = 4  # ... of which the first ones after the random first token are greedy
    seed: int = 0  # fixes which samples are drawn and the algorithm's randomness
    batch_size: int = 32  # generation batch; reconstruction minibatch
    cache_limit_mb: float = 1024  # above this, a unit's cached activations are memory-mapped from disk
    options: Any = None  # the algorithm's options dataclass; None: its defaults

    def __init__(
        self,
        algorithm: str = "none",
        num_samples: int = 1024,
        dataloader: str = "train",
        generate_length: int = 128,
        generate_greedy: int = 4,
        seed: int = 0,
        batch_size: int = 32,
        cache_limit_mb: float = 1024,
        options: Any = None,
        **algorithm_options: Any,
    ) -> None:
        self.algorithm = algorithm
        self.num_samples = num_samples
        self.dataloader = dataloader
        self.generate_length = generate_length
        self.generate_greedy = generate_greedy
        self.seed = seed
        self.batch_size = batch_size
        self.cache_limit_mb = cache_limit_mb
        if options is None or algorithm_options:
            from lightning_quant.ptq.registry import ALGORITHMS  # the registry imports this module

            options = ALGORITHMS[algorithm].make_options(options, **algorithm_options)
        self.options = options


@dataclass
class BlockOptions:
    """Options of algorithms that work block by block on a transformer (GPTQ, Norm Tweaking, ...)."""

    blocks: Optional[str] = None  # module whose children are the blocks; None: found on the module tree

    def check(self) -> None:
        if self.blocks is not None and self.blocks.strip() == "":
            raise OptionError("blocks", self.blocks, "a module name, or null")
