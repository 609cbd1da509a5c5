"""Documents as one token array in memory (evaluation), the token cache's location, and the vocabulary check."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kmodel.data.sources import DataError


@dataclass(frozen=True)
class TokenizedDocs:
    """Documents as one token array; every document ends with EOS."""

    tokens: np.ndarray  # (total,) int32
    doc_ends: np.ndarray  # (documents,) int64: end offset of each document, its EOS included
    text_bytes: int  # UTF-8 bytes of the documents' text, for bits per byte


def default_cache_dir() -> Path:
    """$KMODEL_CACHE, else ~/.cache/kmodel; sources prepared on the fly live under its tokens/ folder."""
    return Path(os.environ.get("KMODEL_CACHE") or Path.home() / ".cache" / "kmodel")


def check_vocab(tokenizer: Any, model_vocab_size: int) -> None:
    """Refuse a tokenizer whose ids the model's embedding cannot hold (a larger, padded model vocab is fine)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'directory', tokenizer)} has vocab_size {tokenizer.vocab_size}, "
            f"larger than the model's model.vocab_size {model_vocab_size}; use the tokenizer the recipe was made for "
            f"or raise model.vocab_size"
        )
