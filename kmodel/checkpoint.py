"""Checkpoint directories: what a saved model is, and how it is written and read back.

    step_0000100/
        model.safetensors   global parameter names (and global expert indices), the router biases
        config.yaml         the fully resolved recipe
        tokenizer/          the tokenizer the model was trained with, when there is one
        state.pt            trainer state (optimizer, scheduler, RNG, data position): tensors and plain
                            containers only, loaded with weights_only=True
        manifest.json       sha256 of every file above (the provenance ledger records these)

A checkpoint is written under a temporary name and renamed into place, so a kill at any moment leaves
either the old set of checkpoints or the new one, never a half-written directory under a final name.
`load_model(path)` needs nothing but the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kmodel.config import Config, ConfigError, config_from_dict

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module | dict[str, torch.Tensor],
    cfg: Config,
    *,
    tokenizer: Any | None = None,
    state: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write a checkpoint atomically at `directory`; returns the manifest (file -> sha256). `model` is the
    model or its full state (a distributed engine's gathered weights: global names, full tensors)."""
    final = Path(directory)
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = model if isinstance(model, dict) else model_state(model)
    # One metadata key only: safetensors writes a metadata map in hash order, so two keys make the same
    # weights hash differently from one save to the next.
    save_file(weights, tmp / MODEL_FILE, metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER_DIR)
    if state is not None:
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
    root = Path(run_dir)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / MODEL_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


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


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    ckpt = resolve_checkpoint(path)
    try:
        return load_file(ckpt / MODEL_FILE)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {MODEL_FILE}: {error}") from None


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
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
    model.load_state_dict(weights, strict=True)


def read_state(path: str | Path) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} has no trainer state ({STATE_FILE})") from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {STATE_FILE}: {error}") from None


def load_model(path: str | Path, device: torch.device | str = "cpu", kernels: dict[str, str] | None = None):
    """The model saved in a checkpoint directory (or the latest checkpoint of a run directory), in eval mode."""
    from kmodel.model import build_model

    ckpt = resolve_checkpoint(path)
    cfg = load_config_from_checkpoint(ckpt)
    for op, choice in (kernels or {}).items():
        setattr(cfg.kernels, op, choice)
    model = build_model(cfg, device, init=False)
    load_weights_into(model, read_weights(ckpt), str(ckpt))
    model.to(device)
    return model.eval()
