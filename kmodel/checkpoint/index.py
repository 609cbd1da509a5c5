"""The sharded layout's index: which shard file holds which piece of which global tensor, and reading a global
tensor (or a block of its rows) back from its pieces, whatever world size, expert-parallel size or ZeRO stage
wrote them.

    index.json  {"format": "kmodel-sharded/1", "world_size": W,
                 "tensors": {"model": {name: {"dtype", "shape", "pieces": [{"file", "key", "begin", "end"}]}},
                             "optimizer": {...}}}

A piece is a range [begin, end) of the global tensor's elements in row-major order: a whole tensor, an
expert-parallel rank's block of experts (leading rows) and a ZeRO partition of a flattened parameter are all
such ranges. A whole tensor is stored under its own name and shape (a one-piece checkpoint is plain
safetensors); a part is stored 1-D under `name@begin`. The pieces of a tensor tile it exactly (checked when the
index is made).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kmodel.checkpoint.files import SAFETENSORS_DTYPES, TORCH_DTYPES, CheckpointError, LazyTensor

INDEX_FILE = "index.json"
INDEX_FORMAT = "kmodel-sharded/1"


def shard_file(kind: str, rank: int, world: int) -> str:
    return f"{kind}-{rank:05d}-of-{world:05d}.safetensors"


@dataclass(frozen=True)
class PieceSpec:
    """Elements [begin, end) of the global tensor `name` (dtype, global shape)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def whole(self) -> bool:
        return self.begin == 0 and self.end == math.prod(self.shape)

    @property
    def key(self) -> str:
        return self.name if self.whole else f"{self.name}@{self.begin}"

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.shape if self.whole else (self.end - self.begin,)

    @classmethod
    def rows(cls, name: str, dtype: torch.dtype, shape: tuple[int, ...], first: int, count: int) -> PieceSpec:
        """Leading rows [first, first + count) of a tensor (an expert-parallel rank's experts)."""
        row = math.prod(shape[1:])
        return cls(name, dtype, tuple(shape), first * row, (first + count) * row)


def index_entries(kind_pieces: dict[str, list[tuple[str, PieceSpec]]], world: int) -> dict[str, Any]:
    """The index from every kind's (file, piece) list; refuses pieces that overlap, leave a gap or disagree on
    dtype or shape, naming the tensor."""
    tensors: dict[str, dict[str, Any]] = {}
    for kind, placed in kind_pieces.items():
        entries: dict[str, Any] = {}
        for file, piece in placed:
            entry = entries.setdefault(piece.name, {"dtype": SAFETENSORS_DTYPES[piece.dtype], "shape": list(piece.shape), "pieces": []})
            if entry["dtype"] != SAFETENSORS_DTYPES[piece.dtype] or entry["shape"] != list(piece.shape):
                raise CheckpointError(f"{kind} tensor {piece.name}: ranks disagree on its dtype or shape")
            entry["pieces"].append({"file": file, "key": piece.key, "begin": piece.begin, "end": piece.end})
        for name, entry in entries.items():
            entry["pieces"].sort(key=lambda p: p["begin"])
            position = 0
            for p in entry["pieces"]:
                if p["begin"] != position:
                    what = "overlap" if p["begin"] < position else "a gap"
                    raise CheckpointError(f"{kind} tensor {name}: the ranks' pieces leave {what} at element {min(position, p['begin'])}")
                position = p["end"]
            if position != math.prod(entry["shape"]):
                raise CheckpointError(f"{kind} tensor {name}: pieces cover {position} of {math.prod(entry['shape'])} elements")
        tensors[kind] = dict(sorted(entries.items()))
    return {"format": INDEX_FORMAT, "world_size": world, "tensors": tensors}


class ShardedTensor(LazyTensor):
    """A global tensor of a sharded checkpoint, read on `load` (all of it, or a block of leading rows) or
    `load_flat` (a range of its elements) from the pieces that hold those elements."""

    def __init__(self, ckpt: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...], pieces: list[dict[str, Any]]):
        super().__init__(ckpt, name, dtype, shape)
        self.pieces = pieces

    def load(self, rows: slice | None = None) -> torch.Tensor:
        first, stop = (0, self.shape[0] if self.shape else 1) if rows is None else rows.indices(self.shape[0])[:2]
        if rows is not None and rows.step not in (None, 1):
            raise ValueError("only contiguous row blocks can be read")
        row = math.prod(self.shape[1:]) if self.shape else 1
        shape = self.shape if rows is None else (stop - first, *self.shape[1:])
        return self.load_flat(first * row, stop * row).reshape(shape)

    def load_flat(self, begin: int, end: int) -> torch.Tensor:
        out = torch.empty(end - begin, dtype=self.dtype)
        for piece in self.pieces:
            lo, hi = max(begin, piece["begin"]), min(end, piece["end"])
            if lo >= hi:
                continue
            file = self.path / piece["file"]
            if piece["key"] == self.name:  # the whole tensor, in its own shape
                values = LazyTensor(file, self.name, self.dtype, self.shape).load_flat(lo, hi)
            else:
                with safe_open(file, framework="pt") as f:
                    values = f.get_slice(piece["key"])[lo - piece["begin"]:hi - piece["begin"]]
            out[lo - begin:hi - begin] = values.reshape(-1)
        return out


def read_index(ckpt: Path) -> dict[str, Any]:
    try:
        index = json.loads((ckpt / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {INDEX_FILE}: {error}") from None
    if index.get("format") != INDEX_FORMAT:
        raise CheckpointError(f"checkpoint {ckpt}: {INDEX_FILE} has an unknown format {index.get('format')!r}")
    return index


def sharded_tensors(ckpt: Path, kind: str) -> dict[str, ShardedTensor]:
    """Every global tensor of one kind (`model`, `optimizer`) of a sharded checkpoint, unread."""
    entries = read_index(ckpt)["tensors"].get(kind, {})
    try:
        return {name: ShardedTensor(ckpt, name, TORCH_DTYPES[e["dtype"]], tuple(e["shape"]), e["pieces"])
                for name, e in entries.items()}
    except (KeyError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {ckpt}: {INDEX_FILE} is malformed ({error})") from None
