"""From a recipe's data section to batches: tokenizer, tokenized sources, the training mixture, held-out files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kmodel.config import Config
from kmodel.data.manifest import file_entry
from kmodel.data.packing import Mixture, SourceStream
from kmodel.data.sources import DataError, read_file_texts, read_hub_texts
from kmodel.data.tokenized import TokenizedDocs, check_vocab, tokenize_cached


def load_tokenizer(spec: str):
    """`shipped` (kmodel's Korean tokenizer) or a tokenizer directory."""
    from kmodel.tokenizer import SHIPPED_TOKENIZER, Tokenizer

    return Tokenizer.load(SHIPPED_TOKENIZER if spec == "shipped" else Path(spec))


def checkpoint_tokenizer(checkpoint: Path, cfg: Config):
    """The tokenizer saved in a checkpoint, else the one its recipe names; checked against the model's vocab."""
    from kmodel.checkpoint import TOKENIZER_DIR
    from kmodel.tokenizer import Tokenizer

    saved = Path(checkpoint) / TOKENIZER_DIR
    if saved.is_dir():
        tokenizer = Tokenizer.load(saved)
    elif cfg.data is not None:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    else:
        raise DataError(f"checkpoint {checkpoint} has no {TOKENIZER_DIR}/ and its recipe names no data.tokenizer")
    check_vocab(tokenizer, cfg.model.vocab_size)
    return tokenizer


def file_docs(path: str | Path, tokenizer: Any, cache_dir: Path | None, text_key: str = "text", sha256: str | None = None) -> TokenizedDocs:
    """One local file's documents, tokenized (through the cache when `cache_dir` is given)."""
    path = Path(path)
    digest = sha256 or file_entry(path)["sha256"]
    return tokenize_cached(digest, text_key, tokenizer, cache_dir, lambda: read_file_texts(path, text_key))


def source_docs(entry: dict[str, Any], tokenizer: Any, cache_dir: Path | None) -> TokenizedDocs:
    """A data-manifest source entry's documents, every file tokenized, in manifest order."""
    key = entry["text_key"]
    if entry["hub"]:
        digest = "+".join(f["sha256"] for f in entry["files"])
        return tokenize_cached(digest, key, tokenizer, cache_dir, lambda: read_hub_texts(entry["path"], key)[0])
    return TokenizedDocs.concatenate([file_docs(f["path"], tokenizer, cache_dir, key, f["sha256"]) for f in entry["files"]])


def training_mixture(cfg: Config, tokenizer: Any, manifest: dict[str, Any], cache_dir: Path | None) -> Mixture:
    """The recipe's weighted, packed, seed-ordered training rows (see kmodel.data.packing)."""
    check_vocab(tokenizer, cfg.model.vocab_size)
    streams = [
        SourceStream(source_docs(entry, tokenizer, cache_dir), cfg.data.seq_len, cfg.seed, index, entry["name"])
        for index, entry in enumerate(manifest["sources"])
    ]
    weights = [entry["weight"] for entry in manifest["sources"]]
    return Mixture(streams, weights, cfg.seed, tokenizer.eos_id, cfg.data.document_masking)
