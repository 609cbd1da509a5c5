"""The layout of a run directory, named once.

    DIR/config.yaml      the fully resolved recipe (what runs)
    DIR/metrics.jsonl    one JSON object per logged step, evaluation and checkpoint
    DIR/checkpoints/     step_NNNNNNN/ (see kmodel.checkpoint)
    DIR/plots/           PNG curves
    DIR/ledger.jsonl     the provenance ledger (kmodel.provenance.ledger)
    DIR/summary.txt      the end-of-run summary
    DIR/.lock            held by the process training in DIR

This module names things and lists checkpoint directories (complete or not, by step); whether a checkpoint is
complete and verifies is kmodel.checkpoint's business. It depends on nothing else in kmodel.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
PLOTS_DIR = "plots"
LEDGER_FILE = "ledger.jsonl"
SUMMARY_FILE = "summary.txt"
LOCK_FILE = ".lock"
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
