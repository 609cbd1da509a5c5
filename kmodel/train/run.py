"""A training run in a directory: fresh or resumed, start to summary.

    DIR/config.yaml      the fully resolved recipe (what runs; rewritten when a resume changes an allowed key)
    DIR/metrics.jsonl    one JSON object per logged step and per evaluation
    DIR/checkpoints/     step_NNNNNNN/ (see kmodel.checkpoint), the last train.keep_checkpoints of them
    DIR/plots/           loss.png, lr.png, throughput.png, expert_load.png
    DIR/ledger.jsonl     the provenance ledger (provenance.ledger)
    DIR/summary.txt      the end-of-run summary
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from kmodel.checkpoint import list_checkpoints
from kmodel.config import Config, ConfigError, config_from_dict
from kmodel.data.manifest import without_locations
from kmodel.train.metrics import MetricsLog
from kmodel.rundir import CHECKPOINTS_DIR, CONFIG_FILE
from kmodel.train.trainer import Trainer

# Keys a resumed run may change: they steer logging and bookkeeping, or (max_steps) extend the schedule.
RESUMABLE_CHANGES = (
    "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.max_bad_steps", "train.wandb.",
)
# Keys that only spread the same global batch (micro x accumulation x world) differently over processes.
TOPOLOGY_CHANGES = ("parallel.", "train.micro_batch_size", "train.grad_accum_steps")


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (not empty for a fresh run, nothing to resume, ...)."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def saved_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"cannot resume: {run_dir} has no {CONFIG_FILE} (not a kmodel run directory)")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))


def global_batch(cfg: Config) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.parallel.world_size


def check_resumable(saved: Config, requested: Config, run_dir: Path) -> None:
    """Refuse a resume that changes anything but RESUMABLE_CHANGES, or the topology (TOPOLOGY_CHANGES) when the
    global batch stays the same: checkpoints are topology-free and the data order follows the global batch.
    Data locations may change; the trainer checks the data's content against the checkpoint's."""
    old, new = (_flatten(without_locations(c.to_dict())) for c in (saved, requested))
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    allowed = RESUMABLE_CHANGES + (TOPOLOGY_CHANGES if global_batch(saved) == global_batch(requested) else ())
    refused = [k for k in changed if not k.startswith(allowed)]
    if refused:
        details = "; ".join(f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in refused[:8])
        raise ConfigError(
            f"cannot resume {run_dir} with a different recipe ({details}). A resumed run may change only "
            f"{', '.join(RESUMABLE_CHANGES)}; start a new run directory for anything else"
        )


def write_config(run_dir: Path, cfg: Config) -> None:
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    os.replace(tmp, run_dir / CONFIG_FILE)


def prepare_fresh(run_dir: Path, force: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            raise RunDirError(
                f"{run_dir} is not empty; pass --resume to continue the run in it, or --force to delete it and start over"
            )
        print(f"--force: deleting the previous contents of {run_dir}", file=sys.stderr)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def remove_stale_partials(run_dir: Path) -> None:
    """Half-written (.step_*.tmp-PID) or half-deleted (.step_*.deleting) checkpoints left by a kill."""
    folder = run_dir / CHECKPOINTS_DIR
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name.startswith(".step_") and (".tmp-" in entry.name or entry.name.endswith(".deleting")):
                shutil.rmtree(entry)


def train(
    cfg: Config | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> Trainer:
    """Run (or continue) a training run in `out_dir`; returns the finished Trainer (its summary is printed).

    `cfg` may be None when resuming (the run's own config.yaml is used). `max_steps` sets train.max_steps,
    which the learning-rate schedule spans."""
    run_dir = Path(out_dir)
    cfg = prepare_run(cfg, run_dir, resume=resume, max_steps=max_steps, force=force)
    trainer = Trainer(cfg, run_dir, progress=progress)
    start(trainer, resume)
    trainer.fit()
    print(trainer.finish())
    return trainer


def prepare_run(cfg: Config | None, run_dir: Path, *, resume: bool, max_steps: int | None, force: bool) -> Config:
    """Check the request against the run directory, clean or create it, write config.yaml; returns the config."""
    if resume and force:
        raise RunDirError("--resume and --force contradict each other: --force deletes the run --resume continues")
    if resume:
        saved = saved_config(run_dir)
        cfg = saved.model_copy(deep=True) if cfg is None else cfg
    elif cfg is None:
        raise ConfigError("a fresh run needs a recipe")
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    if resume:
        check_resumable(saved, cfg, run_dir)
        remove_stale_partials(run_dir)
    else:
        prepare_fresh(run_dir, force)
    write_config(run_dir, cfg)
    return cfg


def start(trainer: Trainer, resume: bool, *, writer: bool = True) -> None:
    """Restore the latest checkpoint when resuming and start the ledger; `writer` (rank 0) rewinds the metrics."""
    run_dir = trainer.run_dir
    checkpoints = list_checkpoints(run_dir) if resume else []
    if checkpoints:
        trainer.restore(checkpoints[-1])
        print(f"resuming from {checkpoints[-1]} (step {trainer.step})", file=sys.stderr)
    elif resume:
        print(f"no checkpoint in {run_dir} yet: starting it from step 0", file=sys.stderr)
    if resume and writer:
        MetricsLog(run_dir).rewind(trainer.step)
    trainer.start_ledger(resume)
