"""Prepared data on disk: memory-mapped token shards and the manifest that describes them.

    DIR/manifest.json           written once, when every shard is complete (see below)
    DIR/shards/NAME.tokens      flat token array (uint16 when the vocabulary fits, else uint32), EOS after
                                every document
    DIR/shards/NAME.docs        int64 end offset of every document in NAME.tokens (its EOS included)
    DIR/shards/NAME.json        the shard's record: what it was made from (`key`) and what it holds; written
                                last, so a shard with a record is complete (a killed prepare resumes from them)

This is the layout of Megatron's indexed datasets and OLMo's numpy shards: training maps the token files
and reads the rows it needs, so memory does not grow with the corpus, and never opens `.docs` (rows are
windows of the flat stream; document boundaries inside a row come from the EOS tokens).

manifest.json:
    {"format": "kmodel-prepared/1", "token_dtype": "uint16",
     "tokenizer": {"sha256", "vocab_size", "eos_id"},
     "sources": [{"name", "path", "text_key", "weight", "files": [{"path", "sha256", "bytes"}],
                  "shards": [{"name", "tokens", "documents", "text_bytes", "tokens_sha256", "docs_sha256"}]}],
     "merkle_root": over the source files' sha256 (the data manifest's root for the same files),
     "shards_root": over every shard's tokens_sha256 and docs_sha256, in order}
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from kmodel.data.sources import DataError
from kmodel.hashing import canonical_json, merkle_root, sha256_bytes, sha256_file

PREPARED_FORMAT = "kmodel-prepared/1"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
TOKENS_SUFFIX, DOCS_SUFFIX, RECORD_SUFFIX = ".tokens", ".docs", ".json"
DOC_DTYPE = np.dtype("<i8")
# Memory maps a stream keeps open (each holds a file descriptor); the oldest is closed beyond this.
OPEN_MAPS = 64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    return {"sha256": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}


def shards_root(manifest: dict[str, Any]) -> str:
    return merkle_root([d for s in manifest["sources"] for shard in s["shards"]
                        for d in (shard["tokens_sha256"], shard["docs_sha256"])])


def manifest_sha256(manifest: dict[str, Any]) -> str:
    return sha256_bytes(canonical_json(manifest))


class ShardWriter:
    """Streams documents' token ids into one shard under temporary names; `close` hashes, renames, records."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.tmp = {s: folder / f".{name}{s}.tmp-{os.getpid()}" for s in (TOKENS_SUFFIX, DOCS_SUFFIX)}
        self._tokens = open(self.tmp[TOKENS_SUFFIX], "wb")
        self._docs = open(self.tmp[DOCS_SUFFIX], "wb")
        self.tokens = self.documents = self.text_bytes = 0

    def add(self, encoded: list[list[int]], text_bytes: int) -> None:
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=self.dtype, count=int(lengths.sum()))
        self._tokens.write(flat.tobytes())
        self._docs.write((self.tokens + np.cumsum(lengths)).astype(DOC_DTYPE).tobytes())
        self.tokens += int(lengths.sum())
        self.documents += len(encoded)
        self.text_bytes += text_bytes

    def close(self, key: str) -> dict[str, Any]:
        for f in (self._tokens, self._docs):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        record = {"key": key, "name": self.name, "tokens": self.tokens, "documents": self.documents,
                  "text_bytes": self.text_bytes}
        for suffix, field in ((TOKENS_SUFFIX, "tokens_sha256"), (DOCS_SUFFIX, "docs_sha256")):
            record[field] = sha256_file(self.tmp[suffix])
            os.replace(self.tmp[suffix], self.folder / f"{self.name}{suffix}")
        write_json_atomic(self.folder / f"{self.name}{RECORD_SUFFIX}", record)
        return record

    def abort(self) -> None:
        for f in (self._tokens, self._docs):
            f.close()
        for path in self.tmp.values():
            path.unlink(missing_ok=True)


def read_shard_record(folder: Path, name: str, key: str, verify: bool) -> dict[str, Any] | None:
    """A complete shard's record when it was made from `key` (and, with `verify`, its files hash as recorded)."""
    try:
        record = json.loads((folder / f"{name}{RECORD_SUFFIX}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    for suffix, field in ((TOKENS_SUFFIX, "tokens_sha256"), (DOCS_SUFFIX, "docs_sha256")):
        path = folder / f"{name}{suffix}"
        if not path.is_file() or (verify and sha256_file(path) != record.get(field)):
            return None
    return record


@dataclass
class TokenStream:
    """One source's shards as one flat token stream, read through memory maps opened on first use."""

    label: str
    paths: list[Path]
    counts: np.ndarray  # (shards,) tokens per shard
    dtype: np.dtype

    def __post_init__(self):
        self.ends = np.cumsum(self.counts)
        self._maps: dict[int, np.ndarray] = {}

    @property
    def num_tokens(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            if len(self._maps) >= OPEN_MAPS:
                del self._maps[next(iter(self._maps))]
            self._maps[shard] = np.memmap(self.paths[shard], dtype=self.dtype, mode="r", shape=(int(self.counts[shard]),))
        return self._maps[shard]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, wrapping around its end."""
        out = np.empty(length, dtype=np.int64)
        filled, position, total = 0, start % self.num_tokens, self.num_tokens
        while filled < length:
            shard = int(np.searchsorted(self.ends, position, side="right"))
            first = position - (int(self.ends[shard - 1]) if shard else 0)
            take = min(length - filled, int(self.counts[shard]) - first)
            out[filled : filled + take] = self._map(shard)[first : first + take]
            filled += take
            position = (position + take) % total
        return out


class PreparedData:
    """A prepared directory: its manifest, checked cheaply (format, shard sizes) when opened."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST_FILE
        if not path.is_file():
            hint = " (a prepare that was stopped: run `kmodel data prepare` again to finish it)" \
                if (self.directory / SHARDS_DIR).is_dir() else ""
            raise DataError(f"data.prepared {self.directory}: no {MANIFEST_FILE}{hint}")
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DataError(f"data.prepared {path} is unreadable: {error}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != PREPARED_FORMAT:
            raise DataError(f"data.prepared {path} is not a {PREPARED_FORMAT} manifest")
        self.dtype = np.dtype(self.manifest["token_dtype"])
        for source in self.sources:
            for shard in source["shards"]:
                tokens = self.directory / SHARDS_DIR / f"{shard['name']}{TOKENS_SUFFIX}"
                size = tokens.stat().st_size if tokens.is_file() else None
                if size != shard["tokens"] * self.dtype.itemsize:
                    found = "missing" if size is None else f"{size} bytes"
                    raise DataError(f"data.prepared {self.directory}: shard {tokens} is {found}, the manifest says "
                                    f"{shard['tokens'] * self.dtype.itemsize} bytes; prepare it again")

    @property
    def sources(self) -> list[dict[str, Any]]:
        return self.manifest["sources"]

    @cached_property
    def sha256(self) -> str:
        return manifest_sha256(self.manifest)

    def source_names(self) -> list[str]:
        return [s["name"] for s in self.sources]

    def check_tokenizer(self, tokenizer: Any, where: str) -> None:
        """Refuse a tokenizer other than the one the shards were made with, naming both hashes."""
        made_with = self.manifest["tokenizer"]
        if made_with["sha256"] != tokenizer.fingerprint() or made_with["vocab_size"] != tokenizer.vocab_size:
            raise DataError(
                f"data.prepared {self.directory} was tokenized with tokenizer sha256 {made_with['sha256']} "
                f"(vocab_size {made_with['vocab_size']}), but {where} is sha256 {tokenizer.fingerprint()} "
                f"(vocab_size {tokenizer.vocab_size}); prepare the data with this tokenizer or use the one it was made with"
            )

    def stream(self, name: str) -> TokenStream:
        source = next(s for s in self.sources if s["name"] == name)
        folder = self.directory / SHARDS_DIR
        return TokenStream(
            name,
            [folder / f"{shard['name']}{TOKENS_SUFFIX}" for shard in source["shards"]],
            np.array([shard["tokens"] for shard in source["shards"]], dtype=np.int64),
            self.dtype,
        )

    def verify(self) -> list[str]:
        """Re-hash every shard; the files whose content is not what the manifest records."""
        bad = []
        folder = self.directory / SHARDS_DIR
        for source in self.sources:
            for shard in source["shards"]:
                for suffix, field in ((TOKENS_SUFFIX, "tokens_sha256"), (DOCS_SUFFIX, "docs_sha256")):
                    path = folder / f"{shard['name']}{suffix}"
                    if not path.is_file() or sha256_file(path) != shard[field]:
                        bad.append(str(path))
        if shards_root(self.manifest) != self.manifest["shards_root"]:
            bad.append(f"{self.directory / MANIFEST_FILE} (shards_root)")
        return bad
