"""What watches a training loop from outside the step: stop signals, a hang watchdog, free disk space.

    StopSignals     SIGTERM (the scheduler's kill), SIGUSR1 (SLURM's warning before the time limit) and SIGINT
                    (Ctrl-C) only set a flag; the loop checkpoints after the current step and stops with
                    TrainingInterrupted, whose message says how to resume. A second Ctrl-C interrupts at once.
    HangWatchdog    every rank re-arms a timer at each step (its heartbeat); a step (its collectives included)
                    that outlasts train.hang_timeout_s is a hang: the rank writes the Python stacks of all its
                    threads to DIR/hang/rank-R.pidP.txt and exits with status 1, so the launcher or scheduler restarts
                    the job from its newest checkpoint instead of idling every GPU until the time limit. The timer
                    runs in C (faulthandler), so it fires even when the rank is stuck inside a collective.
    make_room       before a checkpoint is written: when the file system lacks the space of one more
                    checkpoint, older checkpoints are deleted first (never the newest), else the run stops with
                    a one-line error before writing anything.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

HANG_DIR = "hang"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """A stop signal ended the run after a checkpoint; `signum` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class InsufficientSpace(RuntimeError):
    """Not enough free disk for the next checkpoint, even after deleting the older ones."""


class StopSignals:
    """Record the first stop signal instead of dying on it (main thread only; elsewhere a no-op)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Callable | int | None] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if self.received is None:
            self.received = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class HangWatchdog:
    """faulthandler's one-shot timer, re-armed by `beat`: all threads' stacks to DIR/hang/rank-R.pidP.txt and
    exit(1) when `timeout_s` pass without a beat."""

    def __init__(self, run_dir: Path, rank: int, timeout_s: float):
        # one report per process, so a restarted job never overwrites the report of the one that hung
        self.path = Path(run_dir) / HANG_DIR / f"rank-{rank}.pid{os.getpid()}.txt"
        self.rank, self.timeout_s = rank, timeout_s
        self._file = None

    def __enter__(self) -> HangWatchdog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        return self

    def beat(self, step: int) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"rank {self.rank}: no progress for {self.timeout_s:g} s (train.hang_timeout_s) after "
                         f"step {step}; the Python stacks of its threads when it was stopped:\n")
        self._file.flush()
        faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=self._file, exit=True)

    def __exit__(self, *exc) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._file.close()
        self.path.unlink(missing_ok=True)  # no hang: leave no report
        try:
            self.path.parent.rmdir()  # nor an empty folder
        except OSError:
            pass  # other ranks' reports, or a report from before


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_room(folder: Path, need: int, checkpoints: list[Path], delete: Callable[[Path], None]) -> None:
    """Ensure `need` free bytes under `folder`, deleting the oldest of `checkpoints` (never the newest) while
    short; raise InsufficientSpace naming the sizes when that is not enough."""
    folder.mkdir(parents=True, exist_ok=True)
    older = list(checkpoints[:-1])
    while shutil.disk_usage(folder).free < need and older:
        oldest = older.pop(0)
        print(f"low disk space: deleting {oldest.name} before the next checkpoint instead of after it", file=sys.stderr)
        delete(oldest)
    free = shutil.disk_usage(folder).free
    if free < need:
        kept = f"the newest checkpoint, {checkpoints[-1]}, is kept" if checkpoints else "no checkpoint was written yet"
        raise InsufficientSpace(
            f"not enough disk space for the next checkpoint in {folder}: about {need / 1e9:.2f} GB needed, "
            f"{free / 1e9:.2f} GB free; {kept}. Free space, then rerun with --resume"
        )
