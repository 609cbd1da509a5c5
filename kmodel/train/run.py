"""A training run in a directory: fresh or resumed, start to summary.

    DIR/config.yaml      the fully resolved recipe (what runs; rewritten when a resume changes an allowed key)
    DIR/metrics.jsonl    one JSON object per logged step and per evaluation
    DIR/checkpoints/     step_NNNNNNN/ (see kmodel.checkpoint), the last train.keep_checkpoints of them
    DIR/plots/           loss.png, lr.png, throughput.png, expert_load.png
    DIR/ledger.jsonl     the provenance ledger (provenance.ledger)
    DIR/summary.txt      the end-of-run summary
    DIR/.lock            held (flock) by the process training in DIR: a second job is refused

What a run never does: restart silently (a resume that finds no checkpoint where its history says there were
some is refused, naming what is missing, unless --restart), delete what it did not write (--force empties only
a kmodel run directory, after the recipe and the data validated, and never one holding the working directory,
the recipe or the data), or throw records away (metrics a resume rewinds go to metrics.discarded.jsonl).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from kmodel.checkpoint import SharedVerification, latest_valid_checkpoint, list_checkpoints
from kmodel.config import Config, ConfigError, config_from_dict
from kmodel.data.manifest import without_locations
from kmodel.ledger import LedgerError, checkpoint_records, continuation_problem, read_records
from kmodel.train.metrics import MetricsLog, read_metrics
from kmodel.rundir import (
    CHECKPOINTS_DIR, CONFIG_FILE, LEDGER_FILE, LOCK_FILE, METRICS_FILE, STEP_PREFIX, RunDir, checkpoint_dirs, step_of,
)
from kmodel.train.trainer import Trainer

# Keys a resumed run may change: they steer logging and bookkeeping, or (max_steps) extend the schedule.
RESUMABLE_CHANGES = (
    "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint", "train.log_every",
    "train.eval_every", "train.eval_batches", "train.max_bad_steps", "train.hang_timeout_s", "train.wandb.",
)
# Keys that only spread the same global batch (micro x accumulation x world) differently over processes.
TOPOLOGY_CHANGES = ("parallel.", "train.micro_batch_size", "train.grad_accum_steps")


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (not empty for a fresh run, nothing to resume, ...)."""


# What a run that failed before its first step leaves behind; a fresh run may start over it without --force.
UNSTARTED_CONTENTS = {CONFIG_FILE, LEDGER_FILE, METRICS_FILE, CHECKPOINTS_DIR}


def config_changes(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """The keys ("section.key") in which two recipe dicts differ, each with its (old, new) value, in key order;
    a section set on one side only (model.rope_scaling) is one key, lists are compared whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = {}
        for key in sorted(old.keys() | new.keys()):
            changes.update(config_changes(old.get(key), new.get(key), f"{prefix}{key}."))
        return changes
    return {} if old == new else {prefix[:-1]: (old, new)}


def saved_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"cannot resume: {run_dir} has no {CONFIG_FILE} (not a kmodel run directory)")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))


def global_batch(cfg: Config) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.parallel.data_parallel_size


def check_resumable(saved: Config, requested: Config, run_dir: Path) -> None:
    """Refuse a resume that changes anything but RESUMABLE_CHANGES, or the topology (TOPOLOGY_CHANGES) when the
    global batch stays the same: checkpoints are topology-free and the data order follows the global batch.
    Data locations may change; the trainer checks the data's content against the checkpoint's."""
    changed = config_changes(*(without_locations(c.to_dict()) for c in (saved, requested)))
    allowed = RESUMABLE_CHANGES + (TOPOLOGY_CHANGES if global_batch(saved) == global_batch(requested) else ())
    refused = [k for k in changed if not k.startswith(allowed)]
    if refused:
        details = "; ".join(f"{k}: run has {changed[k][0]!r}, now {changed[k][1]!r}" for k in refused[:8])
        raise ConfigError(
            f"cannot resume {run_dir} with a different recipe ({details}). A resumed run may change only "
            f"{', '.join(RESUMABLE_CHANGES)}; for anything else start a new run directory (a new stage: "
            "kmodel train RECIPE --out NEW --init-from CHECKPOINT)"
        )


def write_config(run_dir: Path, cfg: Config) -> None:
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    os.replace(tmp, run_dir / CONFIG_FILE)


def _contents(run_dir: Path) -> list[Path]:
    """What a run directory holds besides its lock file."""
    return sorted(p for p in run_dir.iterdir() if p.name != LOCK_FILE) if run_dir.is_dir() else []


def _readable_config(run_dir: Path) -> bool:
    try:
        saved_config(run_dir)
    except (RunDirError, ConfigError, yaml.YAMLError, UnicodeDecodeError, OSError):
        return False
    return True


def _ledger_checkpoint_steps(run_dir: Path) -> list[int] | None:
    """Steps the run's ledger records checkpoints at; None when there is no ledger or it cannot be read."""
    if not (run_dir / LEDGER_FILE).is_file():
        return None
    try:
        return [r["step"] for r in checkpoint_records(read_records(run_dir / LEDGER_FILE)[0])]
    except LedgerError:
        return None


def never_started(run_dir: Path) -> bool:
    """A run directory whose run failed before its first step: a readable config.yaml, at most a genesis-only
    ledger, no metric record and no checkpoint directory."""
    names = {p.name for p in _contents(run_dir)}
    if not (CONFIG_FILE in names and names <= UNSTARTED_CONTENTS and _readable_config(run_dir)):
        return False
    ledger_clean = LEDGER_FILE not in names or _ledger_checkpoint_steps(run_dir) == []
    return ledger_clean and not read_metrics(run_dir) and not checkpoint_dirs(run_dir)


def _protected_paths(cfg: Config, recipe: str | Path | None) -> list[tuple[str, Path]]:
    """What --force must never delete: the working directory, the recipe, the data and the tokenizer."""
    named = [("the working directory", Path.cwd())]
    if recipe is not None:
        named.append(("the recipe", Path(recipe)))
    if cfg.data is not None:
        for source in cfg.data.sources:
            fixed = source.path.split("*")[0].split("?")[0].split("[")[0]  # the part of a glob before its pattern
            named.append((f"data source {source.name or source.path!r}", Path(fixed or ".")))
        named += [("held-out file", Path(p)) for p in cfg.data.heldout]
        if cfg.data.tokenizer != "shipped":
            named.append(("the tokenizer", Path(cfg.data.tokenizer)))
    return [(what, path.resolve()) for what, path in named]


def check_fresh(run_dir: Path, cfg: Config, *, force: bool, recipe: str | Path | None = None) -> None:
    """Refuse a fresh run in a directory holding anything but a run that never started; with --force, refuse
    any directory that is not a kmodel run or that holds the working directory, the recipe or the data."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory")
    contents = _contents(run_dir)
    if not contents or never_started(run_dir):
        return
    if not force:
        raise RunDirError(
            f"{run_dir} is not empty; pass --resume to continue the run in it, or --force to delete it and start over"
        )
    if not _readable_config(run_dir):
        shown = ", ".join(p.name for p in contents[:5]) + (" ..." if len(contents) > 5 else "")
        raise RunDirError(
            f"--force deletes only a kmodel run directory, and {run_dir} has no readable {CONFIG_FILE} (it holds "
            f"{shown}); choose another --out"
        )
    target = run_dir.resolve()
    for what, path in _protected_paths(cfg, recipe):
        if path == target or target in path.parents:
            raise RunDirError(f"--force would delete {what} ({path}), which is inside {run_dir}; choose another --out")


def clear_fresh(run_dir: Path) -> None:
    """Empty a run directory that `check_fresh` accepted (its lock file stays), creating it when absent."""
    contents = _contents(run_dir)
    if contents and not never_started(run_dir):
        print(f"--force: deleting the previous contents of {run_dir}", file=sys.stderr)
    for entry in contents:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def remove_stale_partials(run_dir: Path) -> None:
    """Half-written (.step_*.tmp-PID) or half-deleted (.step_*.deleting) checkpoints left by a kill."""
    folder = run_dir / CHECKPOINTS_DIR
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name.startswith(f".{STEP_PREFIX}") and (".tmp-" in entry.name or entry.name.endswith(".deleting")):
                shutil.rmtree(entry)


# --- resuming: what the run directory says happened ---------------------------------------------------------


def history(run_dir: Path, cfg: Config) -> list[str]:
    """Evidence that a run wrote checkpoints before: ledger records, metrics past the first checkpoint, step
    directories that are not complete."""
    found = []
    steps = _ledger_checkpoint_steps(run_dir)
    if steps:
        found.append(f"{LEDGER_FILE} records checkpoints at steps {steps[:6]}{' ...' if len(steps) > 6 else ''}")
    reached = max((r["step"] for r in read_metrics(run_dir)), default=0)
    if reached >= cfg.train.checkpoint_every:
        found.append(f"{METRICS_FILE} records steps up to {reached} (a checkpoint was due every "
                     f"{cfg.train.checkpoint_every} steps)")
    incomplete = checkpoint_dirs(run_dir)
    if incomplete:
        found.append(f"{CHECKPOINTS_DIR}/ holds only incomplete {', '.join(p.name for p in incomplete[:3])}")
    return found


def check_resume_target(run_dir: Path, cfg: Config, *, restart: bool, ledger_gap: bool) -> None:
    """Refuse a resume that would silently start over (history but no checkpoint) or continue a ledger that is
    missing or broken; `restart` and `ledger_gap` are the explicit ways past each."""
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and restart:
        raise RunDirError(f"--restart trains again from step 0 only when no checkpoint is left, and {run_dir} has "
                          f"{checkpoints[-1].name}; drop --restart to resume from it")
    if not checkpoints:
        evidence = history(run_dir, cfg)
        if evidence and not restart:
            folder = run_dir / CHECKPOINTS_DIR
            where = "does not exist" if not folder.is_dir() else "holds no complete checkpoint"
            raise RunDirError(
                f"cannot resume {run_dir}: {folder} {where}, yet {'; '.join(evidence)}. If the checkpoint storage "
                "is unmounted, renamed or moved, restore it and resume again; to train this run again from step 0 "
                f"(its history stays in {METRICS_FILE}, {LEDGER_FILE}), pass --restart"
            )
    if cfg.provenance.ledger and not ledger_gap:
        problem = continuation_problem(run_dir, bool(checkpoints))
        if problem:
            raise RunDirError(
                f"cannot resume {run_dir}: {problem}. Restore the ledger from a backup, or pass --ledger-gap to "
                "continue with a new chain whose first record states the gap (provenance verify reports it)"
            )


def set_aside_unrecorded(run_dir: Path) -> None:
    """A checkpoint is committed when the ledger records it: one renamed into place but never recorded (a kill
    between the two) is moved aside as .step_N.unrecorded, and the run resumes from the last recorded one, so
    the batches after it are digested again and verify and replay keep passing."""
    recorded = _ledger_checkpoint_steps(run_dir)
    if recorded is None:
        return
    last = max(recorded, default=0)
    for ckpt in list_checkpoints(run_dir):
        if step_of(ckpt) > last:
            aside = ckpt.with_name(f".{ckpt.name}.unrecorded")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(ckpt, aside)
            print(f"warning: {ckpt} is not in the ledger (killed between saving and recording it): moved aside to "
                  f"{aside.name}; resuming from the last recorded checkpoint (step {last})", file=sys.stderr)


# --- the lock and operating-system errors ------------------------------------------------------------------


class RunLock:
    """An exclusive flock on DIR/.lock while a process trains in DIR. The kernel drops it when the process
    ends, kill -9 included, so a stale lock never blocks a resume; a second live job is refused, naming the
    holder. The directory is created (for a fresh run) and, when nothing else was put in it, removed again."""

    def __init__(self, run_dir: str | Path, *, create: bool):
        self.run_dir, self.create = Path(run_dir), create
        self.path = RunDir(run_dir).lock
        self._fd: int | None = None
        self._made_dir = False

    def __enter__(self) -> RunLock:
        if not self.run_dir.is_dir() and not self.create:
            return self  # nothing to lock: the resume is refused for the missing directory itself
        try:
            if not self.run_dir.exists():
                self.run_dir.mkdir(parents=True)
                self._made_dir = True
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(os_error_message(error, self.run_dir)) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if not isinstance(error, BlockingIOError):  # a file system without flock (some Lustre mounts)
                print(f"warning: cannot lock {self.path} ({error.strerror}): a second job on this run directory "
                      "would not be refused", file=sys.stderr)
                return self
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise RunDirError(
                f"{self.run_dir} is in use by {holder}: two jobs must not write one run directory. Wait for it to "
                "end (or stop it), or train into another --out"
            ) from None
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        if self._made_dir and not _contents(self.run_dir):
            self.path.unlink(missing_ok=True)  # the run never wrote anything: leave no trace
            self.run_dir.rmdir()
        else:
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # releases the flock
        self._fd = None


def os_error_message(error: OSError, run_dir: Path) -> str:
    """One line for an operating-system failure under the run directory, with what to do about it."""
    where = error.filename or run_dir
    if error.errno == errno.ENOSPC:
        latest = list_checkpoints(run_dir)
        kept = f"the latest complete checkpoint is {latest[-1]}" if latest else "no checkpoint was completed yet"
        return (f"no space left on the device of {where}; {kept}. Free space (or lower train.keep_checkpoints), "
                "then rerun with --resume")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {where}: {error.strerror}. Choose a writable --out, or fix the permissions or the "
                "mount of its file system")
    return f"{where}: {error.strerror or error}"


# --- the run ------------------------------------------------------------------------------------------------


def train(
    cfg: Config | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    force: bool = False,
    restart: bool = False,
    ledger_gap: bool = False,
    recipe: str | Path | None = None,
    progress: bool | None = None,
    init_from: str | Path | None = None,
    keep_optimizer: bool | None = None,
) -> Trainer:
    """Run (or continue) a training run in `out_dir`; returns the finished Trainer (its summary is printed).

    `cfg` may be None when resuming (the run's own config.yaml is used). `max_steps` sets train.max_steps,
    which the learning-rate schedule spans. `recipe` (the file `cfg` came from) is protected from --force.
    `init_from` starts a fresh run from a checkpoint's weights, a new stage when it is another run's (see
    Trainer.init_from); `keep_optimizer` False starts fresh optimizer moments (default: kept when it has them).
    The directory is locked for the whole run; nothing in it is written or deleted before the recipe, the
    tokenizer and the data have been loaded."""
    run_dir = Path(out_dir)
    if init_from is not None and resume:
        raise RunDirError("--init-from starts a run; a resumed run continues from its own checkpoints (drop --init-from)")
    if keep_optimizer is not None and init_from is None:
        raise RunDirError("--keep-optimizer and --reset-optimizer choose what a run started with --init-from does with "
                          "the checkpoint's optimizer state; add --init-from CHECKPOINT or drop them")
    with RunLock(run_dir, create=not resume):
        try:
            cfg = check_request(cfg, run_dir, resume=resume, max_steps=max_steps, force=force, restart=restart,
                                ledger_gap=ledger_gap, recipe=recipe)
            trainer = Trainer(cfg, run_dir, progress=progress)
            write_run(cfg, run_dir, resume=resume)
            start(trainer, resume, ledger_gap=ledger_gap, init_from=init_from, keep_optimizer=keep_optimizer)
            trainer.fit()
            print(trainer.finish())
        except OSError as error:
            raise RunDirError(os_error_message(error, run_dir)) from None
    return trainer


def with_max_steps(cfg: Config, max_steps: int) -> Config:
    """`cfg` with train.max_steps replaced, validated as a whole (warmup_steps must still fit)."""
    tree = cfg.to_dict()
    tree["train"]["max_steps"] = max_steps
    return config_from_dict(tree, f"--max-steps {max_steps}")


def check_request(
    cfg: Config | None,
    run_dir: Path,
    *,
    resume: bool,
    max_steps: int | None,
    force: bool,
    restart: bool = False,
    ledger_gap: bool = False,
    recipe: str | Path | None = None,
) -> Config:
    """The config the request runs with, after every check against the run directory; writes nothing."""
    if resume and force:
        raise RunDirError("--resume and --force contradict each other: --force deletes the run --resume continues")
    if (restart or ledger_gap) and not resume:
        raise RunDirError("--restart and --ledger-gap only apply with --resume")
    if resume:
        saved = saved_config(run_dir)
        cfg = saved.model_copy(deep=True) if cfg is None else cfg
    elif cfg is None:
        raise ConfigError("a fresh run needs a recipe")
    if max_steps is not None:
        cfg = with_max_steps(cfg, max_steps)
    if not resume:
        check_fresh(run_dir, cfg, force=force, recipe=recipe)
        return cfg
    check_resumable(saved, cfg, run_dir)
    check_resume_target(run_dir, cfg, restart=restart, ledger_gap=ledger_gap)
    checkpoints = list_checkpoints(run_dir)
    reached = step_of(checkpoints[-1]) if checkpoints else 0
    if cfg.train.max_steps < reached:
        raise ConfigError(
            f"train.max_steps ({cfg.train.max_steps}) is below step {reached}, which {run_dir} has reached "
            f"({checkpoints[-1].name}): a resumed run cannot shorten itself. Give --max-steps {reached} or more, "
            "or start a new run directory"
        )
    return cfg


def write_run(cfg: Config, run_dir: Path, *, resume: bool) -> None:
    """Clean (fresh) or tidy (resumed) the run directory and write config.yaml."""
    if resume:
        remove_stale_partials(run_dir)
        if cfg.provenance.ledger:
            set_aside_unrecorded(run_dir)
    else:
        clear_fresh(run_dir)
    write_config(run_dir, cfg)


def prepare_run(
    cfg: Config | None,
    run_dir: Path,
    *,
    resume: bool,
    max_steps: int | None,
    force: bool,
    restart: bool = False,
    ledger_gap: bool = False,
    recipe: str | Path | None = None,
) -> Config:
    """Check the request against the run directory, clean or create it, write config.yaml; returns the config.
    For callers that build their trainer afterwards (the distributed entry's rank 0): --force first checks that
    the data can be read, since nothing may be deleted for a run that cannot start."""
    cfg = check_request(cfg, run_dir, resume=resume, max_steps=max_steps, force=force, restart=restart,
                        ledger_gap=ledger_gap, recipe=recipe)
    if force and cfg.data is not None:
        from kmodel.data import data_manifest

        data_manifest(cfg.data)
    write_run(cfg, run_dir, resume=resume)
    return cfg


def start(trainer: Trainer, resume: bool, *, writer: bool = True, ledger_gap: bool = False,
          init_from: str | Path | None = None, share: SharedVerification | None = None,
          keep_optimizer: bool | None = None) -> None:
    """Restore the newest checkpoint that verifies when resuming (or the weights of `init_from` for a fresh run,
    its optimizer moments unless `keep_optimizer` is False) and start the ledger; `writer` (rank 0) rewinds the
    metrics (the records dropped are kept in metrics.discarded.jsonl) and names skipped checkpoints; `share`
    splits the verification over the ranks."""
    run_dir = trainer.run_dir
    if init_from is not None:
        source = trainer.init_from(init_from, keep_optimizer)
        moments = {"kept": "optimizer moments kept", "reset": "fresh optimizer moments", "none": "fresh optimizer"}
        print(f"initialised from the weights of {source} ({moments[trainer.init_source['optimizer']]}; the schedule "
              "starts at step 0)", file=sys.stderr)
    latest, skipped = latest_valid_checkpoint(run_dir, warn=writer, share=share) if resume else (None, [])
    if latest is None and skipped:
        raise RunDirError(f"cannot resume {run_dir}: none of its {len(skipped)} checkpoints verifies (reasons above); "
                          "nothing trains on unverified weights. Restore a good copy of one of them")
    if latest is not None:
        trainer.restore(latest)
        print(f"resuming from {latest} (step {trainer.step})", file=sys.stderr)
    elif resume:
        print(f"no checkpoint in {run_dir}: starting it from step 0", file=sys.stderr)
    if resume and writer:
        MetricsLog(run_dir).rewind(trainer.step)
    trainer.ledger_gap = ledger_gap
    trainer.start_ledger(resume)
