"""`kmodel data prepare`: a recipe's sources tokenized in parallel into memory-mapped shards (see shards.py).

    prepare(cfg.data, out, workers=N)

The sources are resolved to files and every file is hashed; each file is cut into parts (sources.file_parts)
and each part becomes one shard, tokenized by a worker process that streams it (one batch of documents in
memory). A shard's record holds the key of what it was made from (file sha256, part, text key, tokenizer),
so a prepare that was killed, or run again, keeps every complete shard that still matches and redoes the rest.
The manifest is written once, when all shards are done.

Training without `data.prepared` prepares its sources the same way into the token cache
($KMODEL_CACHE/tokens/<key of the content and tokenizer>), so there is one path from text to training rows.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import queue
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmodel.config import DataConfig, DataSource
from kmodel.data.shards import (
    MANIFEST_FILE,
    PREPARED_FORMAT,
    SHARDS_DIR,
    PreparedData,
    ShardWriter,
    read_shard_record,
    shards_root,
    token_dtype,
    tokenizer_record,
    write_json_atomic,
)
from kmodel.data.sources import HUB_PREFIX, DataError, file_parts, read_documents, resolve_source
from kmodel.hashing import canonical_json, merkle_root, sha256_bytes, sha256_file

DEFAULT_PART_BYTES = 256 << 20  # input bytes per shard (about 50M tokens of the bundled corpus's mix)
ENCODE_BATCH_BYTES = 1 << 20  # text encoded per call, and the granularity of progress reports
LOCK_FILE = ".prepare.lock"


def load_tokenizer(spec: str):
    """`shipped` (kmodel's Korean tokenizer) or a tokenizer directory."""
    from kmodel.tokenizer import SHIPPED_TOKENIZER, Tokenizer

    return Tokenizer.load(SHIPPED_TOKENIZER if spec == "shipped" else Path(spec))


@dataclass(frozen=True)
class Part:
    """One shard to make: a part of one file of one source."""

    source: int
    name: str  # the shard's file name stem
    path: str  # a local file, or hub:NAME
    text_key: str
    start: int
    stop: int
    key: str  # sha256 of everything the shard's content depends on


def content_key(sources: list[dict[str, Any]], tokenizer_sha256: str) -> str:
    """What prepared data is made of, by content: equal keys give identical shards (paths and weights excluded)."""
    return sha256_bytes(canonical_json({
        "format": PREPARED_FORMAT,
        "tokenizer": tokenizer_sha256,
        "sources": [{"name": s["name"], "text_key": s["text_key"], "files": [f["sha256"] for f in s["files"]]}
                    for s in sources],
    }))


def hashed_sources(sources: list[DataSource], pool=None) -> list[dict[str, Any]]:
    """Each source resolved to its files with their sha256 (hashed in parallel by `pool` when given); Hub
    sources are named by `hub:NAME` and hashed by content as they are read."""
    resolved = [resolve_source(s) for s in sources]
    labels = [r.label for r in resolved]
    twice = sorted({name for name in labels if labels.count(name) > 1})
    if twice:
        raise DataError(f"data.sources: two sources are named {twice[0]!r}; give each a distinct name")
    files = [f for r in resolved for f in r.files]
    for f in files:
        if not f.is_file():
            raise DataError(f"data file {f} does not exist")
    digests = pool.map(sha256_file, files) if pool is not None else [sha256_file(f) for f in files]
    by_path = dict(zip(files, digests))
    out = []
    for r in resolved:
        entries = [{"path": str(f), "sha256": by_path[f], "bytes": f.stat().st_size} for f in r.files]
        if r.hub_name is not None:
            entries = [{"path": HUB_PREFIX + r.hub_name, "sha256": None, "bytes": None}]
        out.append({"name": r.label, "path": r.source.path, "text_key": r.source.text_key,
                    "weight": r.source.weight, "files": entries})
    return out


def plan_parts(sources: list[dict[str, Any]], tokenizer_sha256: str, part_bytes: int) -> list[Part]:
    parts = []
    for s, source in enumerate(sources):
        for f, entry in enumerate(source["files"]):
            hub = entry["path"].startswith(HUB_PREFIX)
            ranges = [(0, 1)] if hub else file_parts(Path(entry["path"]), part_bytes)
            for p, (start, stop) in enumerate(ranges):
                identity = entry["path"] if hub else entry["sha256"]
                key = sha256_bytes(canonical_json([PREPARED_FORMAT, tokenizer_sha256, source["text_key"], identity,
                                                   start, stop, Path(entry["path"]).suffix]))
                parts.append(Part(s, f"s{s:03d}-f{f:05d}-p{p:05d}", entry["path"], source["text_key"], start, stop, key))
    return parts


# --- workers -------------------------------------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(tokenizer, folder: str, progress) -> None:
    """Per process: the tokenizer, the token dtype, the shard folder, where progress goes."""
    _worker.update(tokenizer=tokenizer, dtype=token_dtype(tokenizer.vocab_size), folder=Path(folder), progress=progress)


def _make_shard(part: Part) -> dict[str, Any]:
    """Tokenize one part into its shard (documents streamed, encoded a batch at a time, each ending in EOS)."""
    tokenizer, progress = _worker["tokenizer"], _worker["progress"]
    writer = ShardWriter(_worker["folder"], part.name, _worker["dtype"])
    hub_digest = hashlib.sha256() if part.path.startswith(HUB_PREFIX) else None
    try:
        batch, size = [], 0
        for text in read_documents(part.path, part.text_key, part.start, part.stop):
            batch.append(text)
            size += len(text)
            if hub_digest is not None:
                hub_digest.update(canonical_json(text) + b"\n")
            if size >= ENCODE_BATCH_BYTES:
                _encode(writer, batch, tokenizer, progress)
                batch, size = [], 0
        if batch:
            _encode(writer, batch, tokenizer, progress)
        record = writer.close(part.key)
    except BaseException:
        writer.abort()
        raise
    if hub_digest is not None:
        record["hub_sha256"] = hub_digest.hexdigest()
    return record


def _encode(writer: ShardWriter, texts: list[str], tokenizer, progress) -> None:
    encoded = tokenizer.encode_batch(texts, add_eos=True, num_threads=1)
    before = writer.tokens
    writer.add(encoded, sum(len(t.encode("utf-8")) for t in texts))
    if progress is not None:
        progress.put(writer.tokens - before)


# --- the command ------------------------------------------------------------------------------------------------
@contextmanager
def _locked(directory: Path):
    """One prepare per directory at a time (ranks that auto-prepare the same cache entry wait for the first)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(
    data: DataConfig,
    out: str | Path,
    *,
    workers: int = 1,
    part_bytes: int = DEFAULT_PART_BYTES,
    progress: bool | None = None,
    sources: list[dict[str, Any]] | None = None,
    tokenizer: Any = None,
) -> PreparedData:
    """Tokenize `data.sources` into `out` (resuming a stopped prepare there); returns the prepared data.
    `sources`: the sources already hashed (`hashed_sources`); `tokenizer`: the one loaded from data.tokenizer."""
    out = Path(out)
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    # None: a progress bar on a terminal and the throughput line; False: silent (the token cache).
    show = sys.stderr.isatty() if progress is None else progress
    tokenizer = load_tokenizer(data.tokenizer) if tokenizer is None else tokenizer
    with _locked(out), _workers(workers, tokenizer, out / SHARDS_DIR) as (pool, reports):
        sources = hashed_sources(data.sources, pool) if sources is None else sources
        key = content_key(sources, tokenizer.fingerprint())
        if (out / MANIFEST_FILE).is_file():
            existing = PreparedData(out)
            if existing.manifest.get("content_key") != key:
                raise DataError(
                    f"{out} already holds prepared data of other sources or another tokenizer (content key "
                    f"{existing.manifest.get('content_key')}, this recipe's is {key}); choose another --out")
            return existing
        folder = out / SHARDS_DIR
        parts = plan_parts(sources, tokenizer.fingerprint(), part_bytes)
        _remove_leftovers(folder, {p.name for p in parts})
        done = {p.name: r for p in parts if (r := read_shard_record(folder, p.name, p.key, verify=True))}
        todo = [p for p in parts if p.name not in done]
        if show and done:
            print(f"{out}: {len(done)} of {len(parts)} shards already complete; preparing the other {len(todo)}",
                  file=sys.stderr)
        started = time.perf_counter()
        made = _run_parts(todo, pool, reports, show)
        if made and progress is not False:
            tokens, seconds = sum(r["tokens"] for r in made.values()), time.perf_counter() - started
            print(f"tokenized {tokens:,} tokens into {len(made)} shards in {seconds:.1f} s ({tokens / seconds:,.0f} "
                  f"tokens/s, {workers} worker{'s' * (workers > 1)})", file=sys.stderr)
        done.update(made)
        manifest = _manifest(sources, parts, done, tokenizer, key)
        write_json_atomic(out / MANIFEST_FILE, manifest)
    return PreparedData(out)


def _remove_leftovers(folder: Path, names: set[str]) -> None:
    """Temporary files of a killed prepare, and shards no longer part of the plan."""
    for entry in folder.iterdir():
        stem = entry.name.split(".")[0]
        if entry.name.startswith(".") or stem not in names:
            entry.unlink()


@contextmanager
def _workers(workers: int, tokenizer, folder: Path):
    """(pool, progress queue): `workers` forked processes holding the tokenizer (forked, so nothing is imported
    or loaded again), or no pool and the tokenizer set up in this process."""
    folder.mkdir(parents=True, exist_ok=True)
    if workers == 1:
        reports: Any = queue.SimpleQueue()
        _init_worker(tokenizer, str(folder), reports)
        try:
            yield None, reports
        finally:
            _worker.clear()
        return
    context = multiprocessing.get_context("fork")
    reports = context.Queue()
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer, str(folder), reports)) as pool:
        yield pool, reports


def _run_parts(todo: list[Part], pool, reports, show: bool) -> dict[str, dict]:
    from tqdm import tqdm

    if not todo:
        return {}
    bar = tqdm(unit="tok", unit_scale=True, dynamic_ncols=True, disable=not show, desc="tokenizing")
    records: dict[str, dict] = {}
    try:
        if pool is None:
            for part in todo:
                records[part.name] = _make_shard(part)
                _drain(reports, bar)
                bar.set_postfix(shards=f"{len(records)}/{len(todo)}")
        else:
            pending = {part.name: pool.apply_async(_make_shard, (part,)) for part in todo}
            while pending:
                _drain(reports, bar, timeout=0.2)
                for name in [n for n, r in pending.items() if r.ready()]:
                    records[name] = pending.pop(name).get()  # a worker's DataError is raised here
                    bar.set_postfix(shards=f"{len(records)}/{len(todo)}")
            _drain(reports, bar)
    finally:
        bar.close()
    return records


def _drain(reports, bar, timeout: float | None = None) -> None:
    try:
        bar.update(reports.get(timeout=timeout) if timeout else reports.get_nowait())
        while True:
            bar.update(reports.get_nowait())
    except queue.Empty:
        pass


def _manifest(sources: list[dict[str, Any]], parts: list[Part], records: dict[str, dict], tokenizer, key: str) -> dict:
    out_sources = [{**source, "files": [dict(f) for f in source["files"]], "shards": []} for source in sources]
    documents: dict[str, int] = {}
    for part in parts:
        record = records[part.name]
        out_sources[part.source]["shards"].append({k: record[k] for k in ("name", "tokens", "documents", "text_bytes",
                                                                          "tokens_sha256", "docs_sha256")})
        documents[part.path] = documents.get(part.path, 0) + record["documents"]
        if "hub_sha256" in record:  # a Hub dataset is hashed by the content it streamed
            out_sources[part.source]["files"][0]["sha256"] = record["hub_sha256"]
    empty = [path for path, count in documents.items() if count == 0]
    if empty:
        raise DataError(f"data file {empty[0]} holds no documents")
    manifest = {
        "format": PREPARED_FORMAT,
        "content_key": key,
        "token_dtype": token_dtype(tokenizer.vocab_size).str,
        "tokenizer": tokenizer_record(tokenizer),
        "sources": out_sources,
        "merkle_root": merkle_root([f["sha256"] for s in out_sources for f in s["files"]]),
    }
    manifest["shards_root"] = shards_root(manifest)
    return manifest
