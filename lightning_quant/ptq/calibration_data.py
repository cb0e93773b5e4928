"""Calibration data written by the float model itself (Norm Tweaking's data recipe; ``ptq.dataloader: generated``).

A random first token, a few greedy tokens, then sampling: no real text is needed. That needs a causal language
model (:func:`find_causal_lm`); encoders are calibrated on real text instead.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def find_causal_lm(model: nn.Module) -> Optional[nn.Module]:
    """The first module of ``model`` (itself included) that generates text: a Hugging Face causal LM, or None."""
    for m in model.modules():
        can_generate = getattr(m, "can_generate", None)
        config = getattr(m, "config", None)
        decoder = config is not None and not getattr(config, "is_encoder_decoder", False)
        if callable(can_generate) and decoder and can_generate():
            return m
    return None


def generate_calibration_data(
    lm: nn.Module, num_samples: int = 128, length: int = 128, greedy: int = 4, seed: int = 0, batch_size: int = 32
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches written by the float model itself (Norm Tweaking's data recipe).

    Each sample starts from a uniformly random token, continues with ``greedy`` arg-max tokens, then
    samples from the full softmax (temperature 1, no top-k/top-p) up to ``length`` tokens; end-of-text is
    suppressed so every sample has the full length. Batches are ``{"input_ids", "attention_mask"}`` dicts.
    """
    from transformers import GenerationConfig  # the model is a transformers model, so the package is there

    vocab = int(lm.get_input_embeddings().num_embeddings)  # type: ignore[operator]
    device = next(lm.parameters()).device
    config: Any = lm.config  # a transformers PretrainedConfig (untyped here)
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    batches = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, num_samples, batch_size):
            ids = torch.randint(vocab, (min(batch_size, num_samples - start), 1), device=device)
            for steps, sample in ((greedy, False), (length - 1 - greedy, True)):
                if steps <= 0:
                    continue
                settings = GenerationConfig(
                    max_new_tokens=steps,
                    min_new_tokens=steps,
                    do_sample=sample,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=pad,
                    eos_token_id=config.eos_token_id,
                )
                ids = lm.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings)  # type: ignore[operator]
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches
