"""From a recipe's data section to batches: tokenizer, prepared shards (given, or made on the fly into the
token cache), the training mixture, held-out files. Every token a run reads comes through the shards."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kmodel.config import Config, DataConfig, DataSource
from kmodel.data.order import Mixture
from kmodel.data.manifest import with_prepared_hashes
from kmodel.data.prepare import content_key, hashed_sources, load_tokenizer, prepare
from kmodel.data.shards import DOC_DTYPE, DOCS_SUFFIX, MANIFEST_FILE, SHARDS_DIR, PreparedData
from kmodel.data.sources import DataError
from kmodel.data.tokenized import TokenizedDocs, check_vocab

TOKEN_CACHE_DIR = "tokens"


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


def cached_prepare(data: DataConfig, sources: list[dict[str, Any]], tokenizer: Any, cache_dir: Path | None) -> PreparedData:
    """Sources prepared into the token cache, keyed by their content and the tokenizer (any run, replay or
    evaluation of the same bytes reuses the entry). Entries are small, so they are re-hashed on every use
    and a damaged one is made again."""
    if cache_dir is None:
        cache_dir = Path(tempfile.mkdtemp(prefix="kmodel-tokens-"))
    entry = Path(cache_dir) / TOKEN_CACHE_DIR / content_key(sources, tokenizer.fingerprint())
    try:
        prepared = PreparedData(entry)
        damaged = prepared.verify()
    except DataError as error:  # no entry yet, or one whose manifest or shards are unusable
        prepared, damaged = None, [str(error)] if (entry / MANIFEST_FILE).exists() else []
    if prepared is not None and not damaged:
        return prepared
    if damaged:
        print(f"warning: rebuilding damaged token cache {entry} ({damaged[0]})", file=sys.stderr)
        shutil.rmtree(entry)
    return prepare(data, entry, sources=sources, tokenizer=tokenizer, progress=False)


def prepared_data(data: DataConfig, manifest: dict[str, Any], tokenizer: Any, cache_dir: Path | None) -> PreparedData:
    """The shards a run reads: data.prepared, else its sources prepared into the token cache."""
    if data.prepared is not None:
        prepared = PreparedData(data.prepared)
    else:
        prepared = cached_prepare(data, manifest["sources"], tokenizer, cache_dir)
    prepared.check_tokenizer(tokenizer, f"data.tokenizer {data.tokenizer!r}")
    return prepared


def training_mixture(cfg: Config, tokenizer: Any, manifest: dict[str, Any], cache_dir: Path | None, stage: int = 0) -> Mixture:
    """The recipe's weighted, packed, seed-ordered training rows (see kmodel.data.order). A Hub source's hash,
    known once it has been read, is filled into `manifest` (the run's data manifest) here."""
    check_vocab(tokenizer, cfg.model.vocab_size)
    prepared = prepared_data(cfg.data, manifest, tokenizer, cache_dir)
    with_prepared_hashes(manifest, prepared.manifest)
    streams = [prepared.stream(source["name"]) for source in manifest["sources"]]
    weights = [source["weight"] for source in manifest["sources"]]
    return Mixture(streams, weights, cfg.seed, cfg.data.seq_len, tokenizer.eos_id, cfg.data.document_masking, stage)


def file_docs(path: str | Path, tokenizer: Any, cache_dir: Path | None, text_key: str = "text") -> TokenizedDocs:
    """One local file's documents, tokenized through the token cache and read back whole (evaluation)."""
    data = DataConfig(sources=[DataSource(name="file", path=str(path), text_key=text_key)], tokenizer=str(tokenizer.directory))
    prepared = cached_prepare(data, hashed_sources(data.sources), tokenizer, cache_dir)
    (source,) = prepared.sources
    stream = prepared.stream(source["name"])
    tokens = np.concatenate([np.fromfile(p, dtype=prepared.dtype) for p in stream.paths]).astype(np.int32)
    folder = prepared.directory / SHARDS_DIR
    doc_ends = [np.fromfile(folder / f"{shard['name']}{DOCS_SUFFIX}", dtype=DOC_DTYPE) + int(offset)
                for shard, offset in zip(source["shards"], np.concatenate(([0], stream.ends[:-1])))]
    return TokenizedDocs(tokens, np.concatenate(doc_ends), sum(s["text_bytes"] for s in source["shards"]))
