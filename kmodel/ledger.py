"""The run ledger: an append-only, hash-chained record of how a model was trained.

It sits below the trainer and the engines, which write it, and below kmodel.provenance, which reads, verifies
and replays it: train/ and parallel/ never import kmodel.provenance (tests/test_import_direction.py).

`DIR/ledger.jsonl` holds one JSON record per line. Every record carries `prev_hash`, the hash of the
record before it (64 zeros for the first), and its own `hash`: the sha256 of the record's canonical JSON
(sorted keys, no spaces, UTF-8) without the `hash` field. Editing, removing, reordering or inserting any
record therefore breaks the chain at that point.

    genesis      code commit + hash of uncommitted changes, resolved config (and its hash), environment,
                 tokenizer fingerprint, data manifest, seed, hash of the seed-derived initial weights
    checkpoint   step, digest of every micro-batch's token ids since the previous record, loss, lr,
                 grad norm, and the checkpoint's hashes as its writer took them while writing (manifest.json:
                 the model / state / manifest files, the Merkle roots of the tensor files), with separate
                 hashes of the optimizer and RNG state (`checkpoint_hashes`: no tensor file is read back)
    resume       a training run picked the ledger up again (code and environment at that moment)

Each record is flushed and fsynced before the call returns. The head can be signed with an ed25519 key
(`sign_ledger`), offline; the signature lives next to the ledger in `ledger.sig.json`.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from kmodel.checkpoint import (
    INDEX_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    Manifest,
    read_state,
    read_weights,
    tensor_files_of,
)
from kmodel.checkpoint.files import file_sha256
from kmodel.hashing import (
    canonical_json,
    merkle_root,
    object_sha256,
    sha256_bytes,
    sha256_file,
    sorted_weights_sha256,
    weights_sha256,
)
from kmodel.rundir import CHECKPOINTS_DIR, CONFIG_FILE, LEDGER_FILE, RunDir
SIGNATURE_FILE = "ledger.sig.json"
GENESIS_PREV_HASH = "0" * 64
RECORD_KINDS = ("genesis", "checkpoint", "resume")
# Source folders whose uncommitted changes alter what a run executes (kmodel, kmodel.kernels, kmodel.tokenizer).
SOURCE_DIRS = ("kmodel", "kernels", "tokenizer")


class LedgerError(RuntimeError):
    """A ledger that is missing, malformed, or whose hash chain is broken."""


# --- hashing ------------------------------------------------------------------------------------------


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of a record's canonical JSON, its own `hash` field left out."""
    return sha256_bytes(canonical_json({k: v for k, v in record.items() if k != "hash"}))


def _finite_or_text(value: Any) -> float | str | None:
    """A JSON-safe number: NaN and infinities (a diverged step) are written as text."""
    if value is None:
        return None
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    return number if math.isfinite(number) else repr(number)


# --- code and environment -----------------------------------------------------------------------------


def source_root() -> Path:
    """The directory holding the kmodel source tree (a git checkout when installed editable)."""
    import kmodel

    return Path(kmodel.__file__).resolve().parent.parent


def git_output(root: Path, *args: str) -> bytes | None:
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def code_state(root: Path | None = None) -> dict[str, Any]:
    """The commit the source tree is at, and a hash of everything that differs from it: the tracked diff
    against HEAD plus untracked files in the source folders."""
    root = source_root() if root is None else root
    commit = git_output(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None, "reason": f"{root} is not a git checkout"}
    diff = git_output(root, "diff", "HEAD", "--binary", "--", *SOURCE_DIRS) or b""
    untracked_list = git_output(root, "ls-files", "--others", "--exclude-standard", "-z", "--", *SOURCE_DIRS) or b""
    untracked = sorted(p for p in untracked_list.decode().split("\0") if p)
    digest = hashlib.sha256(diff)
    for rel in untracked:
        digest.update(b"\0untracked:" + rel.encode() + b"\0")
        digest.update(sha256_file(root / rel).encode())
    dirty = bool(diff) or bool(untracked)
    return {
        "commit": commit.decode().strip(),
        "dirty": dirty,
        "diff_sha256": digest.hexdigest() if dirty else None,
        "untracked_files": len(untracked),
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, device and the switches that decide whether training is bit-reproducible."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "deepspeed": _package_version("deepspeed"),
        "numpy": _package_version("numpy"),
        "kmodel": _package_version("kmodel"),
        "device": None if device is None else str(device),
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a resumed run continues with (its config.yaml; a resume may change
    bookkeeping keys such as train.max_steps, which the learning-rate schedule follows)."""
    from kmodel.config import ConfigError, config_from_dict

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {"config_sha256": None, "config": None}
    try:
        cfg = config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except (yaml.YAMLError, ConfigError) as error:
        raise LedgerError(f"cannot resume: {error}") from None
    return {"config_sha256": cfg.fingerprint(), "config": cfg.to_dict()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def initial_weights_sha256(cfg) -> str:
    """The hash of the seed-derived initial weights, streamed tensor by tensor from a meta-device model:
    memory stays at one tensor (one expert's for stacked experts) whatever the model size."""
    from kmodel.model import Model
    from kmodel.model.init import initial_state

    with torch.device("meta"):
        model = Model(cfg.model)
    return sorted_weights_sha256(initial_state(model, cfg.seed, cfg.model.initializer_range))


# --- checkpoint hashes ----------------------------------------------------------------------------------


# How a checkpoint record's hashes were made (`hash_basis`): from the digests the writer recorded, or (records
# without the field, written before) by reading every tensor back.
RECORDED_BASIS = "recorded"


def checkpoint_hashes(checkpoint_dir: Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint record pins, from the digests the checkpoint's writer took while writing (manifest.json:
    every file's sha256, the Merkle root of the tensor files): no tensor file is read again, however large.
    `weights_sha256` is the Merkle root of the files the weights are read from (model.safetensors, or index.json
    and the model shards), `optimizer_sha256` that of the optimizer's entries in state.pt and its moments'
    files; the other parts of the trainer state (state.pt is small: its moments are in the tensor files) are
    hashed each on its own. Given an existing `record` made before `hash_basis` existed, the hashes are made as
    it made them (`content_hashes`), so old ledgers still verify."""
    if record is not None and record.get("hash_basis") != RECORDED_BASIS:
        return content_hashes(checkpoint_dir)
    recorded = _manifest(checkpoint_dir)
    digests = recorded.digests
    state_parts: dict[str, str] = {}
    if STATE_FILE in digests:
        state_parts = _state_parts(checkpoint_dir, moments=False)
        if "optimizer" in state_parts:
            moments = [digests[name] for name in tensor_files_of(recorded, "optimizer")]
            state_parts["optimizer"] = merkle_root([state_parts["optimizer"], *moments])
    return {
        "hash_basis": RECORDED_BASIS,
        "model_sha256": digests.get(MODEL_FILE, recorded.tensor_root),  # sharded: the Merkle root of the shards
        "tensor_root": recorded.tensor_root,
        "weights_sha256": merkle_root([digests[name] for name in tensor_files_of(recorded, "model")]),
        "state_sha256": digests.get(STATE_FILE),
        "manifest_sha256": file_sha256(checkpoint_dir / MANIFEST_FILE),  # remembered by the process that wrote it
        "optimizer_sha256": state_parts.get("optimizer"),
        "rng_sha256": state_parts.get("rng"),
        "state_parts": state_parts,
    }


def content_hashes(checkpoint_dir: Path) -> dict[str, Any]:
    """The hashes of records made before `hash_basis`: the weights' content (`weights_sha256`, independent of
    the file layout) and every state part with its moments, each tensor read back and hashed."""
    recorded = _manifest(checkpoint_dir)
    state_parts = _state_parts(checkpoint_dir, lazy=True) if STATE_FILE in recorded.files else {}
    try:
        lazy = read_weights(checkpoint_dir, lazy=True)
        weights = sorted_weights_sha256((name, lazy[name].load()) for name in sorted(lazy))
    except CheckpointError as error:
        raise LedgerError(str(error)) from None
    return {
        "model_sha256": recorded.digests.get(MODEL_FILE, recorded.tensor_root),
        "tensor_root": recorded.tensor_root,
        "weights_sha256": weights,
        "state_sha256": recorded.digests.get(STATE_FILE),
        "manifest_sha256": file_sha256(checkpoint_dir / MANIFEST_FILE),
        "optimizer_sha256": state_parts.get("optimizer"),
        "rng_sha256": state_parts.get("rng"),
        "state_parts": state_parts,
    }


def _manifest(checkpoint_dir: Path) -> Manifest:
    if not (checkpoint_dir / MANIFEST_FILE).is_file():
        raise LedgerError(f"checkpoint {checkpoint_dir} has no {MANIFEST_FILE}; write the checkpoint before recording it")
    try:
        recorded = Manifest.read(checkpoint_dir)
    except CheckpointError as error:
        raise LedgerError(str(error)) from None
    if MODEL_FILE not in recorded.files and INDEX_FILE not in recorded.files:
        raise LedgerError(f"checkpoint {checkpoint_dir}: {MANIFEST_FILE} lists neither {MODEL_FILE} nor {INDEX_FILE}")
    return recorded


def _state_parts(checkpoint_dir: Path, **how: Any) -> dict[str, str]:
    """object_sha256 of each top-level entry of the trainer state (`read_state(checkpoint_dir, **how)`)."""
    try:
        state = read_state(checkpoint_dir, **how)
        parts = state.items() if isinstance(state, dict) else [("state", state)]
        return {str(key): object_sha256(value) for key, value in parts}
    except CheckpointError as error:
        raise LedgerError(str(error)) from None
    except TypeError as error:
        raise LedgerError(f"checkpoint {checkpoint_dir}: {error}") from None


# --- reading and checking -------------------------------------------------------------------------------


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a ledger file and the number of bytes of a torn final line (a crash mid-write), which
    are not part of any record. Anything else that is not a JSON object per line is an error."""
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_FILE
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}")
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = 0
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        # the last line has no newline: the write of that record never completed
        try:
            json.loads(lines[-1])
        except ValueError:
            torn = len(lines.pop())
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as error:
            raise LedgerError(f"{path}: line {number} is not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise LedgerError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records, torn


def chain_problems(records: list[dict[str, Any]]) -> list[str]:
    """Every way the records fail to form one unbroken chain, each naming the record at fault."""
    problems = []
    if not records:
        return ["the ledger has no records"]
    if records[0].get("kind") != "genesis":
        problems.append(f"record 0 is {records[0].get('kind')!r}, not the genesis record")
    previous_hash, previous_step = GENESIS_PREV_HASH, -1
    for position, record in enumerate(records):
        label = f"record {position} ({record.get('kind')}, step {record.get('step')})"
        if record.get("index") != position:
            problems.append(f"{label}: index is {record.get('index')}, expected {position} (records removed or reordered)")
        if record.get("kind") not in RECORD_KINDS:
            problems.append(f"{label}: unknown kind {record.get('kind')!r}")
        if position > 0 and record.get("kind") == "genesis":
            problems.append(f"{label}: a second genesis record")
        if record.get("prev_hash") != previous_hash:
            problems.append(f"{label}: prev_hash does not match the hash of the record before it")
        actual = record_hash(record)
        if record.get("hash") != actual:
            problems.append(f"{label}: its content does not match its hash (the record was edited)")
        if record.get("kind") == "resume" and isinstance(record.get("resumed_from_step"), int):
            # a resume from an older checkpoint (a newer one failed to verify) redoes the steps after it
            previous_step = record["resumed_from_step"]
        if record.get("kind") == "checkpoint":
            step = record.get("step")
            if not isinstance(step, int) or step <= previous_step:
                problems.append(f"{label}: step {step} does not increase over the previous checkpoint ({previous_step})")
            else:
                previous_step = step
        # chain on the hash the record claims, so one edit is reported once, not at every later record
        previous_hash = record.get("hash")
    return problems


def load_chain(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir/ledger.jsonl`, after checking that the chain is intact."""
    records, _ = read_records(Path(run_dir) / LEDGER_FILE)
    problems = chain_problems(records)
    if problems:
        raise LedgerError(f"ledger {Path(run_dir) / LEDGER_FILE} is broken: " + "; ".join(problems))
    return records


def checkpoint_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "checkpoint"]


def superseded(records: list[dict[str, Any]]) -> set[int]:
    """Positions of checkpoint records that a later resume from an older step redid (a fallback past a damaged
    checkpoint, or --restart): their steps were trained and recorded again, and the directory they name may now
    hold the newer save, which the later record describes."""
    redone = set()
    for position, record in enumerate(records):
        if record.get("kind") == "resume" and isinstance(record.get("resumed_from_step"), int):
            redone |= {earlier for earlier in range(position) if records[earlier].get("kind") == "checkpoint"
                       and isinstance(records[earlier].get("step"), int)
                       and records[earlier]["step"] > record["resumed_from_step"]}
    return redone


def current_checkpoint_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checkpoint records that stand: every one but those `superseded` by a later record of their step."""
    redone = superseded(records)
    return [r for position, r in enumerate(records) if r.get("kind") == "checkpoint" and position not in redone]


def stage_link(checkpoint: str | Path, manifest_sha256: str) -> dict[str, Any] | None:
    """What a new stage's genesis pins of the run it starts from (`--init-from RUN/checkpoints/step_N`, whose
    manifest.json had `manifest_sha256` when its weights were read, so a checkpoint rotated away since is still
    found in the ledger): that
    run's directory and id, its stage number, its ledger head now, and the record of the checkpoint (index,
    hash, step, manifest sha256, Merkle root of the tensor files, weights hash), so verify can walk back through
    every stage. None for a checkpoint outside a run with a ledger (an import: external weights). A run whose
    ledger is broken or does not record the checkpoint is refused: the new stage could not be traced back."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent
    if checkpoint.parent.name != CHECKPOINTS_DIR or not (run_dir / LEDGER_FILE).is_file():
        return None
    try:
        records = load_chain(run_dir)
    except LedgerError as error:
        raise LedgerError(f"--init-from {checkpoint}: {error}; a stage cannot link to it (restore the ledger, or "
                          "copy the checkpoint out of the run directory to start from it as external weights)") from None
    redone = superseded(records)
    matching = [(position, r) for position, r in enumerate(records) if r.get("kind") == "checkpoint"
                and r.get("manifest_sha256") == manifest_sha256 and position not in redone]
    if not matching:
        raise LedgerError(f"--init-from {checkpoint}: {run_dir / LEDGER_FILE} does not record this checkpoint "
                          f"(manifest sha256 {manifest_sha256[:16]}...); start from a checkpoint its run recorded")
    position, record = matching[-1]
    before = (records[0].get("init_from") or {}).get("previous_stage")
    return {
        "stage": before["stage"] + 1 if before else 1,
        "run_dir": str(run_dir.resolve()),
        "run_id": RunDir(run_dir).read_run_id(),
        "ledger_head": {"index": records[-1]["index"], "hash": records[-1]["hash"]},
        "checkpoint_record": {"index": position, "hash": record["hash"]},
        **{key: record.get(key) for key in ("step", "manifest_sha256", "tensor_root", "weights_sha256")},
    }


# --- the ledger a training run writes ----------------------------------------------------------------


class Ledger:
    """Writer side of `run_dir/ledger.jsonl`; `create` starts a run, `open` resumes one."""

    def __init__(self, run_dir: Path, head: dict[str, Any]):
        self.run_dir = run_dir
        self.path = run_dir / LEDGER_FILE
        self.head = head
        self.batches = BatchDigest()

    @classmethod
    def create(
        cls,
        run_dir: str | Path,
        cfg,
        model: torch.nn.Module | str,
        tokenizer: Any | None,
        data_manifest: Any,
        device: torch.device | None = None,
        gap: dict[str, Any] | None = None,
        init_from: dict[str, Any] | None = None,
    ) -> Ledger:
        """Start the ledger of a fresh run; `model` must still hold the seed-derived initial weights (or is the
        sha256 of the full initial weights, `weights_sha256`, when no process holds them all). `device`
        (default: the module's) is recorded in the environment. `gap` starts a new chain for a run whose
        ledger was lost or broken (`--ledger-gap`): what happened, the step and weights it continues from, and
        the ledger set aside; the initial weights are then unknown (None), never the trained ones. `init_from`
        records where external initial weights came from (`--init-from`: the checkpoint, its file hashes and,
        for an import, the sha256 of every source file) and, for another run's checkpoint, the link to that
        run's ledger (`previous_stage`, see `stage_link`): the run is a new stage of it."""
        run_dir = Path(run_dir)
        path = run_dir / LEDGER_FILE
        if path.exists():
            raise LedgerError(f"{path} already exists; a resumed run uses Ledger.open, a fresh run needs an empty run directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        if device is None and isinstance(model, torch.nn.Module):
            first = next(model.parameters(), None)
            device = None if first is None else first.device
        genesis = {
            "kind": "genesis",
            "index": 0,
            "prev_hash": GENESIS_PREV_HASH,
            "time": _now(),
            "run": cfg.name,
            "code": code_state(),
            "config_sha256": cfg.fingerprint(),
            "config": cfg.to_dict(),
            "environment": environment(device),
            "tokenizer_sha256": tokenizer.fingerprint() if tokenizer is not None else None,
            "data_manifest": data_manifest,
            "seed": cfg.seed,
            "init_weights_sha256": model if isinstance(model, str) else weights_sha256(model),
        }
        if init_from is not None:
            previous = stage_link(init_from["checkpoint"], init_from["manifest_sha256"])
            genesis["init_from"] = init_from if previous is None else {**init_from, "previous_stage": previous}
        if gap is not None:
            genesis["gap"] = {**gap, "weights_sha256": genesis["init_weights_sha256"]}
            genesis["init_weights_sha256"] = None
        genesis["hash"] = record_hash(genesis)
        _append_line(path, genesis)
        return cls(run_dir, genesis)

    @classmethod
    def open(cls, run_dir: str | Path, resumed_from_step: int | None = None) -> Ledger:
        """Resume appending to an existing ledger: the chain is checked first, a torn final line left by a
        crash is cut off, and a `resume` record notes the code and environment now running and the step the
        run continues from (an older checkpoint than the last recorded one when a newer one failed to load)."""
        run_dir = Path(run_dir)
        path = run_dir / LEDGER_FILE
        records, torn = read_records(path)
        problems = chain_problems(records)
        if problems:
            raise LedgerError(f"cannot resume: ledger {path} is broken: " + "; ".join(problems))
        if torn:
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size - torn)
                os.fsync(f.fileno())
        ledger = cls(run_dir, records[-1])
        last = checkpoint_records(records)
        ledger._append({
            "kind": "resume",
            "time": _now(),
            "last_recorded_step": last[-1]["step"] if last else None,
            **({} if resumed_from_step is None else {"resumed_from_step": int(resumed_from_step)}),
            "discarded_torn_bytes": torn,
            "code": code_state(),
            "environment": environment(),
            **_run_config(run_dir),
        })
        return ledger

    def observe_batch(self, input_ids: torch.Tensor) -> None:
        """Fold one micro-batch's token ids into the digest of the batches since the last record."""
        self.batches.observe(input_ids)

    def take_batches(self) -> BatchDigest:
        """The digest of the batches since the last checkpoint record, a new one started: for a checkpoint written
        in the background, whose record must cover the batches up to its snapshot only."""
        taken, self.batches = self.batches, BatchDigest()
        return taken

    def record_checkpoint(self, *, step: int, loss: Any, lr: Any, grad_norm: Any, checkpoint_dir: str | Path,
                          batches: BatchDigest | None = None) -> dict[str, Any]:
        """Append the record of a checkpoint just written, covering `batches` (default: those digested since the
        last record, and a new digest is started)."""
        if batches is None:
            batches = self.take_batches()
        checkpoint_dir = Path(checkpoint_dir)
        try:
            location = str(checkpoint_dir.resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            location = str(checkpoint_dir.resolve())
        record = {
            "kind": "checkpoint",
            "time": _now(),
            "step": int(step),
            "batches": batches.count,
            "tokens": batches.tokens,
            "batch_digest": batches.hexdigest(),
            "loss": _finite_or_text(loss),
            "lr": _finite_or_text(lr),
            "grad_norm": _finite_or_text(grad_norm),
            "checkpoint": location,
            **checkpoint_hashes(checkpoint_dir),
        }
        self._append(record)
        return self.head

    def _append(self, fields: dict[str, Any]) -> None:
        record = {"index": self.head["index"] + 1, "prev_hash": self.head["hash"], **fields}
        record["hash"] = record_hash(record)
        _append_line(self.path, record)
        self.head = record


def continuation_problem(run_dir: str | Path, has_checkpoints: bool) -> str | None:
    """Why a resumed run cannot continue its ledger (missing while checkpoints exist, unreadable, broken
    chain), or None when it can."""
    path = Path(run_dir) / LEDGER_FILE
    if not path.is_file():
        if has_checkpoints:
            return (f"{LEDGER_FILE} is missing but the run has checkpoints: a new genesis would record their "
                    "trained weights as the initial weights")
        return None
    try:
        problems = chain_problems(read_records(path)[0])
    except LedgerError as error:
        return str(error)
    return f"ledger {path} is broken: {'; '.join(problems[:3])}" if problems else None


def set_aside(run_dir: str | Path) -> dict[str, Any]:
    """Move a broken ledger out of the way (to ledger.broken-<time>.jsonl) before a gap record starts a new
    chain; returns what the gap record cites of it."""
    path = Path(run_dir) / LEDGER_FILE
    aside = path.with_name(f"{path.stem}.broken-{_now().replace(':', '')}{path.suffix}")
    cited = {"path": aside.name, "sha256": sha256_file(path)}
    os.replace(path, aside)
    return cited


class BatchDigest:
    """Running sha256 over micro-batches of token ids, each prefixed by its shape so that (2, 8) and
    (4, 4) batches of the same ids differ. Replay builds the same digest from regenerated batches."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self.count = 0
        self.tokens = 0

    def observe(self, input_ids) -> None:
        ids = torch.as_tensor(input_ids).detach().to("cpu", torch.int64).contiguous()
        self._digest.update(f"batch:{tuple(ids.shape)}:".encode())
        self._digest.update(ids.reshape(-1).numpy().tobytes())
        self.count += 1
        self.tokens += ids.numel()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _append_line(path: Path, record: dict[str, Any]) -> None:
    line = canonical_json(record) + b"\n"
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# --- signing the head ---------------------------------------------------------------------------------


def _signing_message(head_hash: str, index: int) -> bytes:
    return f"kmodel-ledger-head:{index}:{head_hash}".encode()


def _ed25519():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise LedgerError("ledger signing needs the `cryptography` package (pip install cryptography)") from None
    return ed25519, serialization


def generate_key(path: str | Path) -> str:
    """Write a new ed25519 private key (PEM, owner-readable only); returns the public key as hex."""
    ed25519, serialization = _ed25519()
    path = Path(path)
    if path.exists():
        raise LedgerError(f"key file {path} already exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign_ledger(run_dir: str | Path, key_path: str | Path) -> dict[str, Any]:
    """Sign the current head of the ledger with an ed25519 private key (PEM) and write ledger.sig.json."""
    ed25519, serialization = _ed25519()
    run_dir = Path(run_dir)
    head = load_chain(run_dir)[-1]
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise LedgerError(f"cannot read the signing key {key_path}: {error}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise LedgerError(f"signing key {key_path} is not an ed25519 private key")
    signature = {
        "algorithm": "ed25519",
        "index": head["index"],
        "head_hash": head["hash"],
        "public_key": key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex(),
        "signature": key.sign(_signing_message(head["hash"], head["index"])).hex(),
        "time": _now(),
    }
    path = run_dir / SIGNATURE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(signature, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return signature


def check_signature(run_dir: str | Path, records: list[dict[str, Any]], public_key: str | None = None) -> tuple[bool, str]:
    """Whether ledger.sig.json is a valid signature of one record of this chain (the head when it was
    signed). `public_key` (hex) pins whose key must have signed; without it the embedded key is used."""
    ed25519, _ = _ed25519()
    path = Path(run_dir) / SIGNATURE_FILE
    try:
        signature = json.loads(path.read_text(encoding="utf-8"))
        index, head_hash = int(signature["index"]), signature["head_hash"]
        key_hex = public_key or signature["public_key"]
        key = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
        raw = bytes.fromhex(signature["signature"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return False, f"{SIGNATURE_FILE} is unreadable: {error}"
    if public_key is not None and signature.get("public_key") != public_key:
        return False, f"signed by key {signature.get('public_key')}, not the expected {public_key}"
    if not 0 <= index < len(records) or records[index].get("hash") != head_hash:
        return False, f"the signed head (record {index}, {head_hash[:12]}...) is not a record of this ledger"
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(raw, _signing_message(head_hash, index))
    except InvalidSignature:
        return False, "the signature does not verify with the public key"
    covered = "all records" if index == len(records) - 1 else f"records 0..{index} of {len(records)}"
    return True, f"ed25519 signature by {key_hex[:16]}... covers {covered}"
