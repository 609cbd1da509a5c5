"""The hashes kmodel records: of files, of canonical JSON, of tensors and nested trainer state, and Merkle roots.

Checkpoints, data manifests and the provenance ledger all hash through this module, so one byte sequence has
one digest wherever it is recorded. It depends on nothing else in kmodel.

    sha256_file / sha256_bytes   hex sha256 of a file (read in 1 MiB blocks) or of bytes
    canonical_json               sorted keys, no spaces, UTF-8, no NaN: the bytes a JSON record is hashed as
    object_sha256                dicts, lists, tensors and scalars (what a trainer state holds), typed and ordered
    weights_sha256               a model's tensors by name, independent of device and DDP / compile prefixes
    merkle_root                  leaf = sha256(0x00 || digest), parent = sha256(0x01 || left || right), an
                                 unpaired last node moves up unchanged; the root of no leaves is sha256(b"")
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

# Prefixes that wrappers (DDP, torch.compile) put in front of parameter names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
READ_BLOCK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def merkle_root(digests: list[str]) -> str:
    """Root of a Merkle tree over hex digests, in the order given (see the module docstring)."""
    level = [hashlib.sha256(b"\x00" + bytes.fromhex(d)).digest() for d in digests]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        paired = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        level = paired + level[len(paired) * 2 :]
    return level[0].hex()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor in row-major order, on the CPU."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _update_with_tensor(digest, tensor: torch.Tensor) -> None:
    digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(tensor_bytes(tensor))


def strip_wrapper_prefix(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def weights_sha256(model_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """Hash of a model's state (names, dtypes, shapes, raw bytes, in name order), independent of the device
    it lives on and of DDP / torch.compile name prefixes."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return sorted_weights_sha256(sorted((strip_wrapper_prefix(name), tensor) for name, tensor in state.items()))


def sorted_weights_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """`weights_sha256` of (name, tensor) pairs already in name order, consumed one at a time (so a
    generator can stream a model far larger than memory)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(name.encode() + b"\0")
        _update_with_tensor(digest, tensor)
    return digest.hexdigest()


def object_sha256(value: Any) -> str:
    """Hash of a nested structure of dicts, lists, tensors and scalars (what a trainer state holds). A value
    with a `load()` method that returns a tensor (kmodel.checkpoint.LazyTensor) is read only when hashed, so a
    checkpoint's moments are hashed one tensor at a time. Anything else raises TypeError naming where it is."""
    digest = hashlib.sha256()
    _update_with_object(digest, value, "")
    return digest.hexdigest()


def _update_with_object(digest, value: Any, where: str) -> None:
    if not isinstance(value, torch.Tensor) and callable(getattr(value, "load", None)):
        value = value.load()
    if isinstance(value, torch.Tensor):
        _update_with_tensor(digest, value)
    elif isinstance(value, dict):
        digest.update(f"dict:{len(value)}:".encode())
        for key in sorted(value, key=repr):
            digest.update(f"key:{key!r}:".encode())
            _update_with_object(digest, value[key], f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}:{len(value)}:".encode())
        for i, item in enumerate(value):
            _update_with_object(digest, item, f"{where}[{i}]")
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r}:".encode())
    else:
        raise TypeError(f"cannot hash {type(value).__name__} at state{where}; a state must hold tensors and plain containers")
