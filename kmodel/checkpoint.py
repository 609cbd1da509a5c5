"""Checkpoint directories: what a saved model is, and how it is written and read back.

    step_0000100/
        model.safetensors   global parameter names (and global expert indices), the router biases
        config.yaml         the fully resolved recipe
        tokenizer/          the tokenizer the model was trained with, when there is one
        state.pt            trainer state (optimizer steps and hyper-parameters, scheduler, RNG, data
                            position): tensors and plain containers only, loaded with weights_only=True
        optimizer.safetensors  the AdamW moments, `state.<parameter index>.<exp_avg|exp_avg_sq>` (the
                            torch AdamW state_dict layout, split out of state.pt; `read_state` merges them)
        manifest.json       sha256 of every file above (the provenance ledger records these)

A checkpoint is written under a temporary name and renamed into place, so a kill at any moment leaves
either the old set of checkpoints or the new one, never a half-written directory under a final name.
`load_model(path)` needs nothing but the directory.

Tensor files are written one tensor at a time (`TensorStream`, `write_safetensors`) and can be read one
tensor, or a block of rows, at a time (`LazyTensor`): a distributed engine gathers, writes and restores a
model far larger than one process's memory (kmodel.parallel.engine).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file

from kmodel.config import Config, ConfigError, config_from_dict
from kmodel.hashing import sha256_file
from kmodel.rundir import CONFIG_FILE, checkpoint_dirs

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


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


def write_safetensors(path: Path, stream: TensorStream) -> None:
    """A safetensors file written tensor by tensor: 8-byte little-endian header length, the JSON header (dtype,
    shape, byte range of every tensor; padded to 8 bytes), then the raw bytes in header order. One metadata
    key and the stream's order make the bytes a function of the contents."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in stream.specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    values = iter(stream.values)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, dtype, shape in stream.specs:
            value = next(values, None)
            if value is None or value.dtype != dtype or tuple(value.shape) != shape:
                got = "nothing" if value is None else f"{value.dtype} {tuple(value.shape)}"
                raise CheckpointError(f"{path.name}: {name} should be {dtype} {shape}, got {got}")
            f.write(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if next(values, None) is not None:
        raise CheckpointError(f"{path.name}: more tensors than the header lists")


class LazyTensor:
    """One tensor of a safetensors file, read on `load` (all of it, or a block of leading rows): restoring or
    hashing a checkpoint this way holds one tensor at a time."""

    def __init__(self, path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...]):
        self.path, self.name, self.dtype, self.shape = path, name, dtype, shape

    def load(self, rows: slice | None = None) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.name) if rows is None else f.get_slice(self.name)[rows]


def lazy_tensors(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file, unread."""
    with safe_open(path, framework="pt") as f:
        return {
            name: LazyTensor(path, name, TORCH_DTYPES[f.get_slice(name).get_dtype()], tuple(f.get_slice(name).get_shape()))
            for name in f.keys()
        }


def split_moments(state: dict[str, Any]) -> tuple[dict[str, Any], TensorStream | None]:
    """The trainer state without the optimizer's per-parameter tensors (AdamW's moments; the 0-d step counts
    stay), and those tensors as `state.<index>.<key>` for optimizer.safetensors."""
    optimizer = state.get("optimizer")
    if not optimizer or not optimizer.get("state"):
        return state, None
    kept, moments = {}, {}
    for index, entry in optimizer["state"].items():
        kept[index] = {k: v for k, v in entry.items() if not (isinstance(v, torch.Tensor) and v.ndim > 0)}
        moments.update({f"state.{index}.{k}": v for k, v in entry.items() if k not in kept[index]})
    return {**state, "optimizer": {**optimizer, "state": kept}}, TensorStream.of(moments)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module | Mapping[str, torch.Tensor] | TensorStream,
    cfg: Config,
    *,
    tokenizer: Any | None = None,
    state: dict[str, Any] | None = None,
    optimizer_moments: TensorStream | None = None,
) -> dict[str, str]:
    """Write a checkpoint atomically at `directory`; returns the manifest (file -> sha256). `model` is the
    model, its full state, or a stream of it (a distributed engine's gather: global names, full tensors).
    The optimizer's moments are split out of `state` into optimizer.safetensors, or come as a stream
    (`optimizer_moments`, with `state` then holding none). The weights are written first, then the moments:
    a caller producing both streams by collectives relies on that order."""
    final = Path(directory)
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if isinstance(model, TensorStream):
        weights = model
    else:
        weights = TensorStream.of(model if isinstance(model, Mapping) else model_state(model))
    write_safetensors(tmp / MODEL_FILE, weights)
    (tmp / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER_DIR)
    if state is not None:
        if optimizer_moments is None:
            state, optimizer_moments = split_moments(state)
        if optimizer_moments is not None:
            write_safetensors(tmp / OPTIMIZER_FILE, optimizer_moments)
        torch.save(state, tmp / STATE_FILE)
    manifest = {
        str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return manifest


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run directory (or of its checkpoints/ folder), oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if (p / MODEL_FILE).is_file()]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path} is neither a checkpoint directory (no {MODEL_FILE}) nor a run with checkpoints")
    return found[-1]


def load_config_from_checkpoint(path: str | Path) -> Config:
    ckpt = resolve_checkpoint(path)
    config_path = ckpt / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {CONFIG_FILE}")
    try:
        return config_from_dict(yaml.safe_load(config_path.read_text(encoding="utf-8")), str(config_path))
    except (yaml.YAMLError, ConfigError) as error:
        raise CheckpointError(f"checkpoint {ckpt}: bad {CONFIG_FILE}: {error}") from None


def verify_manifest(path: str | Path) -> None:
    """Check every file of a checkpoint against its recorded sha256."""
    ckpt = resolve_checkpoint(path)
    manifest_path = ckpt / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {MANIFEST_FILE}")
    for name, expected in json.loads(manifest_path.read_text()).items():
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {name} is missing")
        if sha256_file(file) != expected:
            raise CheckpointError(f"checkpoint {ckpt}: {name} does not match its recorded sha256 (corrupt or edited)")


def _read_tensors(ckpt: Path, file: str, lazy: bool) -> dict[str, torch.Tensor] | dict[str, LazyTensor]:
    try:
        return lazy_tensors(ckpt / file) if lazy else load_file(ckpt / file)
    except (SafetensorError, OSError, KeyError) as error:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {file}: {error}") from None


def read_weights(path: str | Path, *, lazy: bool = False) -> dict[str, torch.Tensor] | dict[str, LazyTensor]:
    """The model's tensors by name (`lazy`: unread `LazyTensor`s)."""
    return _read_tensors(resolve_checkpoint(path), MODEL_FILE, lazy)


def _rows_shape(shape: tuple[int, ...], rows: slice | None) -> tuple[int, ...]:
    return shape if rows is None else (len(range(*rows.indices(shape[0]))), *shape[1:])


def load_weights_into(
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor | LazyTensor],
    source: str,
    rows: Callable[[str], slice | None] | None = None,
) -> None:
    """Strict load that names every missing, unexpected or mis-shaped tensor, one tensor at a time (lazy
    tensors are read as they are copied). `rows(name)` picks a block of leading rows of a checkpoint tensor
    (an expert-parallel rank's experts), or None for all of it."""
    expected = model.state_dict(keep_vars=True)
    pick = {k: rows(k) if rows else None for k in expected}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: checkpoint {_rows_shape(tuple(weights[k].shape), pick[k])} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if _rows_shape(tuple(weights[k].shape), pick[k]) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        raise CheckpointError(f"{source} does not fit this model config: " + "; ".join(parts))
    with torch.no_grad():
        for name, target in expected.items():
            value = weights[name]
            if isinstance(value, LazyTensor):
                value = value.load(pick[name])
            elif pick[name] is not None:
                value = value[pick[name]]
            target.copy_(value)


def read_state(path: str | Path, *, lazy: bool = False) -> dict[str, Any]:
    """The trainer state, the optimizer's moments merged back from optimizer.safetensors (`lazy`: as unread
    `LazyTensor`s)."""
    ckpt = resolve_checkpoint(path)
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} has no trainer state ({STATE_FILE})") from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {STATE_FILE}: {error}") from None
    if (ckpt / OPTIMIZER_FILE).is_file():
        entries = state.get("optimizer", {}).get("state", {})
        for name, tensor in _read_tensors(ckpt, OPTIMIZER_FILE, lazy).items():
            _, index, key = name.split(".", 2)
            if int(index) not in entries:
                raise CheckpointError(f"checkpoint {ckpt}: {OPTIMIZER_FILE} has {name}, but {STATE_FILE} no optimizer entry {index}")
            entries[int(index)][key] = tensor
    return state


def load_model(path: str | Path, device: torch.device | str = "cpu", kernels: dict[str, str] | None = None):
    """The model saved in a checkpoint directory (or the latest checkpoint of a run directory), in eval mode."""
    from kmodel.model import build_model

    ckpt = resolve_checkpoint(path)
    cfg = load_config_from_checkpoint(ckpt)
    for op, choice in (kernels or {}).items():
        setattr(cfg.kernels, op, choice)
    model = build_model(cfg, device, init=False)
    load_weights_into(model, read_weights(ckpt, lazy=True), str(ckpt))
    model.to(device)
    return model.eval()
