"""The layout of a run directory, named once.

    DIR/config.yaml      the fully resolved recipe (what runs)
    DIR/metrics.jsonl    one JSON object per logged step, evaluation and checkpoint
    DIR/checkpoints/     step_NNNNNNN/ (see kmodel.checkpoint)
    DIR/plots/           PNG curves
    DIR/ledger.jsonl     the provenance ledger (kmodel.ledger)
    DIR/summary.txt      the end-of-run summary
    DIR/.lock            held by the process training in DIR
    DIR/run_id           a random id made at the first checkpoint; every checkpoint records it, so one copied
                         in from another run is recognised

This module names things and lists checkpoint directories (complete or not, by step); whether a checkpoint is
complete and verifies is kmodel.checkpoint's business. It depends on nothing else in kmodel.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
PLOTS_DIR = "plots"
LEDGER_FILE = "ledger.jsonl"
SUMMARY_FILE = "summary.txt"
LOCK_FILE = ".lock"
RUN_ID_FILE = "run_id"
STEP_PREFIX = "step_"


class RunDir:
    """A run directory's paths, one property per layout name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def plots(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def ledger(self) -> Path:
        return self.path / LEDGER_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def run_id_file(self) -> Path:
        return self.path / RUN_ID_FILE

    def read_run_id(self) -> str | None:
        """The run's id, or None for a run that has not saved a checkpoint yet (or predates run ids)."""
        path = self.run_id_file
        if not path.is_file():
            return None
        return path.read_text(encoding="utf-8").strip() or None

    def run_id(self, adopt: str | None = None) -> str:
        """The run's id, made when there is none yet (written atomically): `adopt`, the id its checkpoints already
        carry, or a random one."""
        existing = self.read_run_id()
        if existing is not None:
            return existing
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{RUN_ID_FILE}.tmp-{os.getpid()}"
        tmp.write_text((adopt or uuid.uuid4().hex) + "\n", encoding="utf-8")
        os.replace(tmp, self.run_id_file)
        return self.read_run_id()


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def step_of(path: str | Path) -> int | None:
    """The step a `step_NNNNNNN` directory holds, or None for any other name."""
    name = Path(path).name
    digits = name[len(STEP_PREFIX):]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every `step_NNNNNNN` directory of a run directory (or of its checkpoints/ folder), complete or not,
    oldest step first. Temporary and moved-aside directories (names starting with '.') are not listed."""
    root = Path(run_dir)
    if (root / CHECKPOINTS_DIR).is_dir():
        root = root / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)
