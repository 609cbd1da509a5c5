"""Tensor files: safetensors written one tensor at a time and hashed while written, read one tensor (or a block of
rows) at a time, and checked for truncation from their own header.

A file written here is hashed on its way to the disk (`FileRecord`: sha256 and size), so a checkpoint's manifest
never needs the file read back. A digest this process computed (by writing or by hashing) is remembered with the
file's size and modification time, so reading a file right after writing or verifying it does not hash it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kmodel.hashing import sha256_file


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, from another run, or does not fit the model it is
    loaded into; the message names the file."""


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int


# path -> (size, mtime_ns, sha256) of digests this process computed
_known_digests: dict[str, tuple[int, int, str]] = {}


def remember_digest(path: Path, sha256: str) -> None:
    stat = os.stat(path)
    _known_digests[str(Path(path).resolve())] = (stat.st_size, stat.st_mtime_ns, sha256)


def move_digests(old_dir: Path, new_dir: Path) -> None:
    """Keep the digests remembered for the files of a directory renamed from `old_dir` to `new_dir` (a rename
    keeps size and modification time), so a checkpoint just committed is not hashed again."""
    old, new = str(Path(old_dir).resolve()), str(Path(new_dir).resolve())
    for path in [p for p in _known_digests if p.startswith(old + os.sep)]:
        _known_digests[new + path[len(old):]] = _known_digests.pop(path)


def file_sha256(path: Path) -> str:
    """sha256 of a file, from memory when this process wrote or hashed it and it has not changed since."""
    stat = os.stat(path)
    known = _known_digests.get(str(Path(path).resolve()))
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    digest = sha256_file(path)
    remember_digest(path, digest)
    return digest


class HashingFile:
    """A binary file opened for writing that hashes and counts every byte on its way out."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(path, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        self._digest.update(data)
        self.size += self._file.write(data)

    def close(self) -> FileRecord:
        """Flush, fsync and close; the record of what was written."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        record = FileRecord(self._digest.hexdigest(), self.size)
        remember_digest(self.path, record.sha256)
        return record

    def abandon(self) -> None:
        self._file.close()


def write_bytes(path: Path, data: bytes) -> FileRecord:
    out = HashingFile(path)
    out.write(data)
    return out.close()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class TensorStream:
    """Tensors produced one at a time (a distributed gather), so a file never needs them all in memory: each
    (name, dtype, shape) up front for the file header, then the values in that order."""

    specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    values: Iterable[torch.Tensor]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> TensorStream:
        """Tensors already in memory, in name order."""
        names = sorted(tensors)
        return cls([(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names], (tensors[n] for n in names))

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.specs)


def tensor_buffer(tensor: torch.Tensor):
    """A tensor's bytes as a buffer (no copy when it is already a contiguous CPU tensor)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def safetensors_header(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte little-endian length and the JSON header (dtype, shape, byte range of every tensor; padded to
    8 bytes). One metadata entry by default and the given order make the bytes a function of the contents."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(path: Path, stream: TensorStream, metadata: dict[str, str] | None = None) -> FileRecord:
    """A safetensors file written tensor by tensor, hashed as it is written and fsynced."""
    out = HashingFile(path)
    try:
        out.write(safetensors_header(stream.specs, metadata))
        values = iter(stream.values)
        for name, dtype, shape in stream.specs:
            value = next(values, None)
            if value is None or value.dtype != dtype or tuple(value.shape) != shape:
                got = "nothing" if value is None else f"{value.dtype} {tuple(value.shape)}"
                raise CheckpointError(f"{path.name}: {name} should be {dtype} {shape}, got {got}")
            out.write(tensor_buffer(value))
        if next(values, None) is not None:
            raise CheckpointError(f"{path.name}: more tensors than the header lists")
    except BaseException:
        out.abandon()
        raise
    return out.close()


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole (unreadable header, shorter or longer than its header says), or
    None. Reads the header only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"truncated: {size} bytes, not even a header"
            length = struct.unpack("<Q", prefix)[0]
            if length > size - 8:
                return f"truncated: {size} bytes, the header alone needs {length + 8}"
            header = json.loads(f.read(length))
    except (OSError, ValueError) as error:
        return f"unreadable header ({error})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + length + end
    if size < expected:
        return f"truncated: {size} bytes, its header needs {expected}"
    if size > expected:
        return f"{size} bytes, its header accounts for {expected}"
    return None


class LazyTensor:
    """One tensor of a safetensors file, read on `load` (all of it, or a block of leading rows) or `load_flat` (a
    range of its elements): restoring a checkpoint this way holds one tensor, or one rank's part of it, at a time."""

    def __init__(self, path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...]):
        self.path, self.name, self.dtype, self.shape = path, name, dtype, shape

    def load(self, rows: slice | None = None) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.name) if rows is None else f.get_slice(self.name)[rows]

    def load_flat(self, begin: int, end: int) -> torch.Tensor:
        """Elements [begin, end) of the tensor in row-major order (a ZeRO partition, an expert optimizer's
        piece), 1-D, reading only the rows that hold them."""
        if not self.shape:
            return self.load().reshape(-1)[begin:end]
        row = math.prod(self.shape[1:])
        first = begin // row
        rows = self.load(slice(first, -(-end // row)))
        return rows.reshape(-1)[begin - first * row:end - first * row]


def lazy_tensors(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file, unread."""
    try:
        with safe_open(path, framework="pt") as f:
            return {
                name: LazyTensor(path, name, TORCH_DTYPES[f.get_slice(name).get_dtype()], tuple(f.get_slice(name).get_shape()))
                for name in f.keys()
            }
    except (SafetensorError, OSError, KeyError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
