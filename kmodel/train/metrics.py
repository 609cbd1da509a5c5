"""Where metrics go: always DIR/metrics.jsonl (one JSON object per line), optionally Weights & Biases.

Records carry `kind`: "train" (one per logged step) or "eval" (held-out results; `final` for the end-of-run
one). A resumed run first moves the records past the checkpoint it resumes from, and the end-of-run
evaluation it will redo, to metrics.discarded.jsonl, so the file reads as one uninterrupted run and no
record is ever lost.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from kmodel.rundir import METRICS_FILE

# Records a resume took out of metrics.jsonl (steps redone after a kill, or a whole history before --restart).
DISCARDED_FILE = "metrics.discarded.jsonl"


def _json_safe(value: Any) -> Any:
    """NaN and infinities as strings: JSON has no such numbers and a skipped step's loss may be one."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """(records, [(line number, text) of every line that is not a record]); a final line torn by a kill
    (no newline) is neither."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        record = _record(line)
        if record is not None:
            records.append(record)
        elif line.strip():
            bad.append((number, line))
    if _record(torn) is not None:  # complete but unterminated: keep it
        records.append(_record(torn))
    return records, bad


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete record: a line that is not one (a hand edit, a disk error) is skipped with a warning
    naming it, and the records after it are kept; a final line torn by a kill is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records, bad = _parse_lines(path)
    if bad:
        numbers = ", ".join(str(n) for n, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
        print(f"warning: {path}: skipped {len(bad)} line(s) that are not metric records (line {numbers})", file=sys.stderr)
    return records


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_json_safe(record), ensure_ascii=False) + "\n")

    def rewind(self, step: int) -> None:
        """Keep only the records up to `step` (atomically), for a run resumed from that step's checkpoint.
        Nothing is thrown away: the records dropped (steps to be redone, the end-of-run evaluation, lines that
        are not records) are appended to metrics.discarded.jsonl first."""
        if not self.path.is_file():
            return
        records, bad = _parse_lines(self.path)
        kept = [r for r in records if r["step"] <= step and not r.get("final")]
        dropped = [json.dumps(r, ensure_ascii=False) for r in records if not (r["step"] <= step and not r.get("final"))]
        dropped += [line for _, line in bad]
        if dropped:
            with open(self.path.with_name(DISCARDED_FILE), "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in dropped))
                f.flush()
                os.fsync(f.fileno())
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


class WandbLog:
    """Mirrors metric records to wandb, imported only when enabled; a missing wandb warns and logs nothing."""

    def __init__(self, run_dir: Path, cfg) -> None:
        self.run = None
        settings = cfg.train.wandb
        if not settings.enabled or settings.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            print("warning: train.wandb.enabled but wandb is not installed (pip install 'kmodel[wandb]'); "
                  "metrics go to metrics.jsonl only", file=sys.stderr)
            return
        # One wandb run per run directory, so a resumed run continues the same wandb run.
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=settings.project, name=cfg.name, id=run_id, resume="allow", mode=settings.mode,
            dir=str(run_dir), config=cfg.to_dict(),
        )

    def write(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(_flatten(record), step=record["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
