"""Documents turned into token ids, cached on disk by content.

A file's documents become one int32 array with EOS after every document. The array is cached under
`cache_dir/tokens/<key>.npz`, where the key hashes the file's sha256, the text key and the tokenizer's
fingerprint, so a cached array is reused exactly when it would come out the same and never otherwise.
The cache root is `$KMODEL_CACHE`, else `~/.cache/kmodel`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kmodel.data.sources import DataError

CACHE_VERSION = "kmodel-tokens/1"


@dataclass(frozen=True)
class TokenizedDocs:
    """Documents as one token array; every document ends with EOS."""

    tokens: np.ndarray  # (total,) int32
    doc_ends: np.ndarray  # (documents,) int64: end offset of each document, its EOS included
    text_bytes: int  # UTF-8 bytes of the documents' text, for bits per byte

    @property
    def doc_starts(self) -> np.ndarray:
        return np.concatenate(([0], self.doc_ends[:-1]))

    @staticmethod
    def concatenate(parts: list["TokenizedDocs"]) -> "TokenizedDocs":
        offsets = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
        return TokenizedDocs(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.doc_ends + off for p, off in zip(parts, offsets)]),
            sum(p.text_bytes for p in parts),
        )


def default_cache_dir() -> Path:
    return Path(os.environ.get("KMODEL_CACHE") or Path.home() / ".cache" / "kmodel")


def check_vocab(tokenizer: Any, model_vocab_size: int) -> None:
    """Refuse a tokenizer whose ids the model's embedding cannot hold (a larger, padded model vocab is fine)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'directory', tokenizer)} has vocab_size {tokenizer.vocab_size}, "
            f"larger than the model's model.vocab_size {model_vocab_size}; use the tokenizer the recipe was made for "
            f"or raise model.vocab_size"
        )


def tokenize_texts(texts: list[str], tokenizer: Any) -> TokenizedDocs:
    encoded = tokenizer.encode_batch(texts, add_eos=True)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter((i for ids in encoded for i in ids), dtype=np.int32, count=int(lengths.sum()))
    return TokenizedDocs(tokens, np.cumsum(lengths), sum(len(t.encode("utf-8")) for t in texts))


def _cache_path(cache_dir: Path, content_sha256: str, text_key: str, tokenizer: Any) -> Path:
    key = hashlib.sha256(f"{CACHE_VERSION}:{content_sha256}:{text_key}:{tokenizer.fingerprint()}".encode()).hexdigest()
    return cache_dir / "tokens" / f"{key}.npz"


def _read_cache(path: Path) -> TokenizedDocs | None:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return TokenizedDocs(arrays["tokens"], arrays["doc_ends"], int(arrays["text_bytes"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:  # a damaged cache entry is rebuilt
        print(f"warning: ignoring unreadable token cache {path}: {error}", file=sys.stderr)
        return None


def _write_cache(path: Path, docs: TokenizedDocs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, tokens=docs.tokens, doc_ends=docs.doc_ends, text_bytes=np.int64(docs.text_bytes))
    os.replace(tmp, path)


def tokenize_cached(content_sha256: str, text_key: str, tokenizer: Any, cache_dir: Path | None, read_texts) -> TokenizedDocs:
    """The tokenized documents of content with this sha256: from the cache, or `read_texts()` encoded and cached."""
    path = None if cache_dir is None else _cache_path(Path(cache_dir), content_sha256, text_key, tokenizer)
    docs = None if path is None else _read_cache(path)
    if docs is None:
        docs = tokenize_texts(read_texts(), tokenizer)
        if path is not None:
            _write_cache(path, docs)
    return docs
