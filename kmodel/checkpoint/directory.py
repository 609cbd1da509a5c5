"""A checkpoint directory: written atomically, verified before anything in it is used.

Writing: every file goes into `.step_N.tmp-<pid>` and is hashed as it is written; the manifest is written last,
then the directory is renamed into place. Reading: every reader names the files it uses and they are checked
against the manifest first (`verified`); resume picks the newest checkpoint that verifies completely
(`latest_valid_checkpoint`), skipping the others with their reason.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from kmodel.checkpoint.files import (
    CheckpointError,
    FileRecord,
    LazyTensor,
    TensorStream,
    file_sha256,
    fsync_dir,
    lazy_tensors,
    move_digests,
    remember_digest,
    safetensors_problem,
    write_bytes,
    write_safetensors,
)
from kmodel.checkpoint.index import INDEX_FILE, sharded_tensors
from kmodel.config import Config, ConfigError, config_from_dict
from kmodel.hashing import merkle_root
from kmodel.rundir import CHECKPOINTS_DIR, CONFIG_FILE, RunDir, checkpoint_dirs, step_of

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FORMAT = "kmodel-checkpoint/2"


@dataclass
class Manifest:
    """What manifest.json records: every file's sha256 and size, the Merkle root over the tensor files' digests
    (in file-name order), the step and the run that wrote it. A format-1 manifest (a flat file -> sha256 map)
    reads as one with no sizes, step or run."""

    files: dict[str, FileRecord]
    step: int | None = None
    run_id: str | None = None
    tensor_root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def digests(self) -> dict[str, str]:
        return {name: record.sha256 for name, record in self.files.items()}

    def to_json(self) -> str:
        return json.dumps({
            "format": MANIFEST_FORMAT, "step": self.step, "run_id": self.run_id, "tensor_root": self.tensor_root,
            **self.extra,
            "files": {name: {"sha256": r.sha256, "bytes": r.bytes} for name, r in sorted(self.files.items())},
        }, indent=1)

    @classmethod
    def read(cls, ckpt: Path) -> Manifest:
        path = ckpt / MANIFEST_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: no {MANIFEST_FILE} (a save that never finished)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") == MANIFEST_FORMAT:
                files = {name: FileRecord(r["sha256"], int(r["bytes"])) for name, r in data["files"].items()}
                extra = {k: v for k, v in data.items() if k not in ("format", "step", "run_id", "tensor_root", "files")}
                return cls(files, data.get("step"), data.get("run_id"), data.get("tensor_root"), extra)
            if "format" not in data and all(isinstance(v, str) for v in data.values()):
                return cls({name: FileRecord(digest, -1) for name, digest in data.items()})
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST_FILE} is unreadable ({error}); the checkpoint cannot be trusted") from None
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST_FILE} has an unknown format {data.get('format')!r}")


def tensor_files(names) -> list[str]:
    return sorted(n for n in names if n.endswith(".safetensors"))


def check_file(ckpt: Path, name: str, record: FileRecord) -> None:
    """One file against its manifest record; raises CheckpointError naming the file and what is wrong."""
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt}: {name} is missing (the manifest lists it)")
    size = path.stat().st_size
    if record.bytes >= 0 and size != record.bytes:
        kind = "truncated" if size < record.bytes else "longer than written"
        raise CheckpointError(f"checkpoint {ckpt}: {name} is {kind} ({size} bytes, {record.bytes} were written)")
    if name.endswith(".safetensors"):
        problem = safetensors_problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {ckpt}: {name} is {problem}")
    if file_sha256(path) != record.sha256:
        raise CheckpointError(f"checkpoint {ckpt}: {name} does not match its recorded sha256 (corrupt, edited or replaced)")


def verify_checkpoint(
    path: str | Path,
    *,
    run_id: str | None = None,
    files: list[str] | None = None,
    need_state: bool = False,
) -> Manifest:
    """Check a checkpoint before it is used: the manifest exists and lists the weights and config (and, with
    `need_state`, the trainer state and the optimizer's moments when the state has any), every listed file (or
    just `files`) is present with its recorded size and sha256, and, given `run_id`, that this run wrote it.
    Raises CheckpointError naming the file; returns the manifest."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    manifest = Manifest.read(ckpt)
    weights = INDEX_FILE if INDEX_FILE in manifest.files else MODEL_FILE
    required = [weights, CONFIG_FILE] + ([STATE_FILE] if need_state else [])
    unlisted = [name for name in required if name not in manifest.files]
    if unlisted:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: its {MANIFEST_FILE} lists no {', '.join(unlisted)}")
    if run_id is not None and manifest.run_id is not None and manifest.run_id != run_id:
        raise CheckpointError(f"checkpoint {ckpt} was written by another run (run id {manifest.run_id}, this run is "
                              f"{run_id}): copied in from elsewhere")
    if manifest.step is not None and step_of(ckpt) is not None and step_of(ckpt) != manifest.step:
        raise CheckpointError(f"checkpoint {ckpt} holds step {manifest.step}, not the step its name says")
    for name in sorted(manifest.files) if files is None else files:
        if name not in manifest.files:
            raise CheckpointError(f"checkpoint {ckpt}: {name} is not in its {MANIFEST_FILE}")
        check_file(ckpt, name, manifest.files[name])
    return manifest


def verified(path: str | Path, files: list[str]) -> Path:
    """A checkpoint directory (or a run's newest valid one) whose `files` match the manifest."""
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt, files=files)
    return ckpt


@dataclass(frozen=True)
class SharedVerification:
    """Ranks that verify a checkpoint together: each hashes every `world`-th file, and `all_ok(ok)` (a collective
    every rank calls) says whether every rank's files matched."""

    rank: int
    world: int
    all_ok: Callable[[bool], bool]


def verify_shared(ckpt: Path, share: SharedVerification, **checks: Any) -> Manifest:
    """`verify_checkpoint` split over the ranks, so a checkpoint is read once in all, not once per rank; the files
    the other ranks checked are then taken as verified here too (their digests remembered for this process)."""
    manifest, error = None, None
    try:
        manifest = Manifest.read(ckpt)
        mine = sorted(manifest.files)[share.rank::share.world]
        verify_checkpoint(ckpt, files=mine, **checks)
    except CheckpointError as failure:
        error = failure
    if not share.all_ok(error is None):
        raise error or CheckpointError(f"checkpoint {ckpt}: another rank found a missing or damaged file (its log names it)")
    for name, record in manifest.files.items():
        if (ckpt / name).is_file():
            remember_digest(ckpt / name, record.sha256)
    return manifest


def latest_valid_checkpoint(
    run_dir: str | Path, *, run_id: str | None = None, need_state: bool = True, warn: bool = False,
    share: SharedVerification | None = None,
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run that verifies completely, and the newer ones skipped with the reason.
    `run_id` defaults to the run directory's own (a checkpoint copied in from another run is skipped).
    `warn` prints one line per skipped checkpoint to stderr. With `share`, the ranks split the hashing."""
    root = Path(run_dir)
    if run_id is None:
        run_id = RunDir(root.parent if root.name == CHECKPOINTS_DIR else root).read_run_id()
    skipped: list[tuple[Path, str]] = []
    for candidate in reversed(checkpoint_dirs(root)):
        try:
            if share is None:
                verify_checkpoint(candidate, run_id=run_id, need_state=need_state)
            else:
                verify_shared(candidate, share, run_id=run_id, need_state=need_state)
        except CheckpointError as error:
            skipped.append((candidate, str(error)))
            if warn:
                print(f"warning: skipping {candidate.name}: {error}", file=sys.stderr)
            continue
        return candidate, skipped
    return None, skipped


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run directory (or of its checkpoints/ folder) whose save finished (a manifest was
    written), oldest first. Whether they verify is `verify_checkpoint`'s question."""
    return [p for p in checkpoint_dirs(run_dir) if (p / MANIFEST_FILE).is_file()]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory that verifies (saying which
    newer ones were skipped and why)."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file() or (path / MODEL_FILE).is_file():
        return path
    found, skipped = latest_valid_checkpoint(path, need_state=False, warn=True)
    if found is None:
        why = f"; {len(skipped)} checkpoint(s) failed verification (see above)" if skipped else ""
        raise CheckpointError(f"{path} is neither a checkpoint directory (no {MANIFEST_FILE}) nor a run with a valid checkpoint{why}")
    return found


def move_aside(path: Path, why: str) -> Path:
    """Rename a checkpoint directory that cannot be used out of the listing (`.step_N.aside-<time>`), so nothing
    is deleted and a new save of that step is not blocked."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    aside = path.with_name(f".{path.name}.aside-{stamp}")
    os.replace(path, aside)
    print(f"warning: moved {path} aside to {aside.name}: {why}", file=sys.stderr)
    return aside


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


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def make_way(final: Path, run_id: str | None) -> None:
    """Before saving at `final`: a directory already there that does not verify (a save cut short, a copy from
    another run) is moved aside; a valid checkpoint of this run is never overwritten."""
    if not final.exists():
        return
    try:
        verify_checkpoint(final, run_id=run_id)
    except CheckpointError as error:
        move_aside(final, str(error))
        return
    raise CheckpointError(f"checkpoint {final} already exists and verifies; refusing to overwrite it")


def run_id_for(directory: Path) -> str | None:
    """The id of the run a checkpoint directory belongs to, or None for a directory outside a run's checkpoints/
    folder. A run without a `run_id` file gets one on its first save: the id most of its checkpoints carry (the
    file was lost; its own checkpoints must stay its own), else a new one."""
    if directory.parent.name != CHECKPOINTS_DIR:
        return None
    run = RunDir(directory.parent.parent)
    if run.read_run_id() is not None:
        return run.read_run_id()
    carried = []
    for ckpt in list_checkpoints(run.path):
        try:
            carried.append(Manifest.read(ckpt).run_id)
        except CheckpointError:
            continue
    counts = Counter(i for i in carried if i)
    return run.run_id(adopt=counts.most_common(1)[0][0] if counts else None)


def commit(tmp: Path, final: Path, files: dict[str, FileRecord], step: int | None, run_id: str | None,
           extra: dict[str, Any] | None = None) -> Manifest:
    """Write the manifest last, make the directory durable and rename it into place."""
    manifest = Manifest(files, step, run_id, merkle_root([files[n].sha256 for n in tensor_files(files)]), extra or {})
    write_bytes(tmp / MANIFEST_FILE, manifest.to_json().encode())
    for sub in {p.parent for p in tmp.rglob("*") if p.is_file()}:
        fsync_dir(sub)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    move_digests(tmp, final)
    return manifest


def write_small_files(tmp: Path, cfg: Config, tokenizer: Any | None) -> dict[str, FileRecord]:
    files = {CONFIG_FILE: write_bytes(tmp / CONFIG_FILE, cfg.to_yaml().encode())}
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER_DIR)
        for p in sorted((tmp / TOKENIZER_DIR).rglob("*")):
            if p.is_file():
                files[str(p.relative_to(tmp))] = FileRecord(file_sha256(p), p.stat().st_size)
    return files


def write_state(tmp: Path, state: dict[str, Any]) -> FileRecord:
    """state.pt (small: the moments are in tensor files), fsynced, then hashed."""
    path = tmp / STATE_FILE
    torch.save(state, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return FileRecord(file_sha256(path), path.stat().st_size)


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module | Mapping[str, torch.Tensor] | TensorStream,
    cfg: Config,
    *,
    tokenizer: Any | None = None,
    state: dict[str, Any] | None = None,
    optimizer_moments: TensorStream | None = None,
    run_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write a checkpoint atomically at `directory`; returns its manifest. `model` is the model, its full
    state, or a stream of it (a distributed engine's gather: global names, full tensors). The optimizer's
    moments are split out of `state` into optimizer.safetensors, or come as a stream (`optimizer_moments`,
    with `state` then holding none). The weights are written first, then the moments: a caller producing both
    streams by collectives relies on that order. `run_id` defaults to the run directory's id; `extra` goes into
    the manifest (e.g. `imported_from`: the files an imported checkpoint came from)."""
    final = Path(directory)
    run_id = run_id if run_id is not None else run_id_for(final)
    make_way(final, run_id)
    tmp = _fresh_tmp(final)
    if isinstance(model, TensorStream):
        weights = model
    else:
        weights = TensorStream.of(model if isinstance(model, Mapping) else model_state(model))
    files = {MODEL_FILE: write_safetensors(tmp / MODEL_FILE, weights)}
    files.update(write_small_files(tmp, cfg, tokenizer))
    if state is not None:
        if optimizer_moments is None:
            state, optimizer_moments = split_moments(state)
        if optimizer_moments is not None:
            files[OPTIMIZER_FILE] = write_safetensors(tmp / OPTIMIZER_FILE, optimizer_moments)
        files[STATE_FILE] = write_state(tmp, state)
    step = state.get("step") if isinstance(state, dict) and isinstance(state.get("step"), int) else step_of(final)
    return commit(tmp, final, files, step, run_id, extra)


def load_config_from_checkpoint(path: str | Path) -> Config:
    ckpt = verified(path, [CONFIG_FILE])
    config_path = ckpt / CONFIG_FILE
    try:
        return config_from_dict(yaml.safe_load(config_path.read_text(encoding="utf-8")), str(config_path))
    except (yaml.YAMLError, ConfigError) as error:
        raise CheckpointError(f"checkpoint {ckpt}: bad {CONFIG_FILE}: {error}") from None


def verify_manifest(path: str | Path) -> None:
    """Check every file of a checkpoint against its recorded sha256 and size."""
    verify_checkpoint(resolve_checkpoint(path))


SINGLE_FILES = {"model": MODEL_FILE, "optimizer": OPTIMIZER_FILE}


def tensor_files_of(manifest: Manifest, kind: str) -> list[str]:
    """The files holding one kind of tensors (`model`, `optimizer`): the one file, or the index and the shards."""
    if INDEX_FILE in manifest.files:
        shards = [name for name in tensor_files(manifest.files) if name.startswith(f"{kind}-")]
        return [INDEX_FILE, *shards]
    return [SINGLE_FILES[kind]] if SINGLE_FILES[kind] in manifest.files else []


def read_tensors(ckpt: Path, kind: str, lazy: bool) -> dict[str, torch.Tensor] | dict[str, LazyTensor]:
    """One kind of tensors by global name, its files verified first; either layout."""
    manifest = Manifest.read(ckpt)
    verify_checkpoint(ckpt, files=tensor_files_of(manifest, kind))
    tensors = sharded_tensors(ckpt, kind) if INDEX_FILE in manifest.files else lazy_tensors(ckpt / SINGLE_FILES[kind])
    return tensors if lazy else {name: t.load() for name, t in tensors.items()}


def read_weights(path: str | Path, *, lazy: bool = False) -> dict[str, torch.Tensor] | dict[str, LazyTensor]:
    """The model's tensors by global name, verified against the manifest first (`lazy`: unread tensors with
    `load(rows=None)`), from either layout."""
    return read_tensors(resolve_checkpoint(path), "model", lazy)


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
            if isinstance(value, torch.Tensor):
                value = value if pick[name] is None else value[pick[name]]
            else:
                value = value.load(pick[name])
            target.copy_(value)


def _is_moment(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 or callable(getattr(value, "load", None))


def read_state(path: str | Path, *, lazy: bool = False, moments: bool = True) -> dict[str, Any]:
    """The trainer state, verified, with the optimizer's moments merged back from optimizer.safetensors
    (`lazy`: as unread `LazyTensor`s; `moments` False: state.pt alone, its moments' files neither verified nor
    read). A state whose optimizer has entries but no moments anywhere is refused (torch's AdamW would fail on
    it mid-step)."""
    ckpt = resolve_checkpoint(path)
    manifest = Manifest.read(ckpt)
    if STATE_FILE not in manifest.files:
        raise CheckpointError(f"checkpoint {ckpt} has no trainer state ({STATE_FILE}): it holds weights only")
    verify_checkpoint(ckpt, files=[STATE_FILE])
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {STATE_FILE}: {error}") from None
    if not moments:
        return state
    entries = state.get("optimizer", {}).get("state", {}) if isinstance(state, dict) else {}
    if tensor_files_of(manifest, "optimizer"):
        for name, tensor in read_tensors(ckpt, "optimizer", lazy).items():
            _, index, key = name.split(".", 2)
            if int(index) not in entries:
                raise CheckpointError(f"checkpoint {ckpt}: the optimizer tensors have {name}, but {STATE_FILE} no optimizer entry {index}")
            entries[int(index)][key] = tensor
    bare = [i for i, entry in entries.items() if not any(_is_moment(v) for v in entry.values())]
    if bare:
        raise CheckpointError(f"checkpoint {ckpt}: the optimizer state has no moments for entries {bare[:5]} "
                              f"({OPTIMIZER_FILE} is missing from it)")
    return state


def load_model(path: str | Path, device: torch.device | str = "cpu", kernels: dict[str, str] | None = None):
    """The model saved in a checkpoint directory (or the newest valid checkpoint of a run directory), verified,
    in eval mode."""
    from kmodel.model import build_model

    ckpt = resolve_checkpoint(path)
    cfg = load_config_from_checkpoint(ckpt)
    for op, choice in (kernels or {}).items():
        setattr(cfg.kernels, op, choice)
    model = build_model(cfg, device, init=False)
    load_weights_into(model, read_weights(ckpt, lazy=True), str(ckpt))
    model.to(device)
    return model.eval()
