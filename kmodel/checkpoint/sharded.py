"""Sharded saves: every rank writes the pieces it owns, in parallel, and one rank commits the checkpoint.

    step_0000100/
        model-00003-of-00004.safetensors      rank 3's pieces of the weights (see kmodel.checkpoint.index)
        optimizer-00003-of-00004.safetensors  rank 3's pieces of the optimizer's moments
        index.json                            which piece of which global tensor lives where
        config.yaml, tokenizer/, state.pt     as in the one-file layout (written by the committing rank)
        manifest.json                         every file's sha256 and size; Merkle root of the shard digests

The protocol needs a file system every rank sees (as a multi-node run's checkpoint storage is):

    rank 0      `prepare`: moves a conflicting step directory aside, makes an empty `.step_N.tmp-sharded`
    (barrier)
    every rank  `write_rank`: its shard files, hashed while written and fsynced, then its fragment
                (`.fragment-RRRRR.json`: its files' digests and pieces), renamed into place last
    rank 0      `commit_sharded`: waits for every fragment, writes index, config, state and manifest, renames
                the directory into place; until then the checkpoint does not exist

Coordination after the barrier is through the files alone, so the writes and the commit can run on background
threads (kmodel.checkpoint.writer) while training continues: no collective runs off the main thread.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kmodel.checkpoint.directory import STATE_FILE, Manifest, commit, make_way, run_id_for, write_small_files, write_state
from kmodel.checkpoint.files import (
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    CheckpointError,
    FileRecord,
    TensorStream,
    write_bytes,
    write_safetensors,
)
from kmodel.checkpoint.index import INDEX_FILE, PieceSpec, index_entries, shard_file
from kmodel.config import Config
from kmodel.rundir import step_of

FRAGMENT_PREFIX = ".fragment-"


def tmp_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-sharded")


def prepare(final: Path, run_id: str | None = None) -> Path:
    """Rank 0, before the barrier: a fresh temporary directory for the ranks to write into."""
    make_way(final, run_id if run_id is not None else run_id_for(final))
    tmp = tmp_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)  # a save cut short earlier; it never became a checkpoint
    tmp.mkdir(parents=True)
    return tmp


@dataclass
class ShardStream:
    """The pieces one rank owns of one kind (weights or moments), declared up front for the file header, then
    their values in that order (any shape with the piece's number of elements)."""

    pieces: list[PieceSpec]
    values: Iterable[torch.Tensor]


def balanced_owners(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], world: int) -> dict[str, int]:
    """Whole tensors spread over `world` ranks so each writes about the same number of bytes: largest first,
    each to the rank with the fewest bytes so far (ties to the lowest rank). Deterministic from the specs."""
    load = [0] * world
    owners = {}
    for name, dtype, shape in sorted(specs, key=lambda s: (-math.prod(s[2]) * s[1].itemsize, s[0])):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += math.prod(shape) * dtype.itemsize
    return owners


def write_rank(tmp: Path, rank: int, world: int, streams: dict[str, ShardStream | None]) -> dict[str, FileRecord]:
    """One rank's shard files (one per kind it owns pieces of), then its fragment, renamed into place last."""
    files: dict[str, FileRecord] = {}
    placed: dict[str, list[list[Any]]] = {}
    for kind, stream in streams.items():
        if stream is None:
            continue
        file = shard_file(kind, rank, world)
        values = iter(stream.values)
        reshaped = (next(values).reshape(p.stored_shape) for p in stream.pieces)
        if stream.pieces:
            files[file] = write_safetensors(tmp / file, TensorStream([(p.key, p.dtype, p.stored_shape) for p in stream.pieces], reshaped))
        placed[kind] = [[file, p.name, SAFETENSORS_DTYPES[p.dtype], list(p.shape), p.begin, p.end] for p in stream.pieces]
    fragment = {"rank": rank, "world_size": world, "files": {f: [r.sha256, r.bytes] for f, r in files.items()}, "pieces": placed}
    name = f"{FRAGMENT_PREFIX}{rank:05d}.json"
    write_bytes(tmp / f"{name}.part", json.dumps(fragment).encode())
    os.replace(tmp / f"{name}.part", tmp / name)
    return files


def wait_for_fragments(tmp: Path, world: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    paths = [tmp / f"{FRAGMENT_PREFIX}{rank:05d}.json" for rank in range(world)]
    while True:
        missing = [rank for rank, p in enumerate(paths) if not p.is_file()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise CheckpointError(f"checkpoint {tmp.name}: ranks {missing[:8]} did not finish writing their shards "
                                  f"within {timeout:.0f} s; the checkpoint was not committed")
        time.sleep(0.05)
    fragments = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    for rank, fragment in enumerate(fragments):
        if fragment["rank"] != rank or fragment["world_size"] != world:
            raise CheckpointError(f"checkpoint {tmp.name}: fragment of rank {rank} is from another save")
    return fragments


def commit_sharded(
    tmp: Path,
    final: Path,
    world: int,
    cfg: Config,
    *,
    state: dict[str, Any] | None = None,
    tokenizer: Any | None = None,
    run_id: str | None = None,
    timeout: float = 3600.0,
) -> Manifest:
    """Rank 0, after every rank's `write_rank`: the index, config, tokenizer and state, then the manifest and
    the rename that makes the checkpoint exist. `state` holds no moments (they are in the optimizer shards)."""
    fragments = wait_for_fragments(tmp, world, timeout)
    files: dict[str, FileRecord] = {}
    kinds: dict[str, list[tuple[str, PieceSpec]]] = {}
    for fragment in fragments:
        files.update({f: FileRecord(digest, size) for f, (digest, size) in fragment["files"].items()})
        for kind, pieces in fragment["pieces"].items():
            kinds.setdefault(kind, []).extend(
                (file, PieceSpec(name, TORCH_DTYPES[dtype], tuple(shape), begin, end))
                for file, name, dtype, shape, begin, end in pieces)
    index = index_entries(kinds, world)
    files[INDEX_FILE] = write_bytes(tmp / INDEX_FILE, json.dumps(index, indent=1).encode())
    files.update(write_small_files(tmp, cfg, tokenizer))
    if state is not None:
        files[STATE_FILE] = write_state(tmp, state)
    for rank in range(world):
        (tmp / f"{FRAGMENT_PREFIX}{rank:05d}.json").unlink()
    step = state.get("step") if isinstance(state, dict) and isinstance(state.get("step"), int) else step_of(final)
    run_id = run_id if run_id is not None else run_id_for(final)
    return commit(tmp, final, files, step, run_id, {"layout": "sharded", "world_size": world})
