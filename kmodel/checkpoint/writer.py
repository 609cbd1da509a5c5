"""Checkpoint writes off the step loop: at most one in flight, its stall and write time measured.

The trainer takes a snapshot first (tensors copied off the training state, on the step loop: that copy and any
wait for the previous save are the stall), then hands the write to `CheckpointWriter.submit`. With
`asynchronous` the write runs on a background thread while training continues; otherwise in the caller. A save
counts only once its directory is renamed into place (kmodel.checkpoint.directory / sharded), so a process
killed mid-write leaves the previous checkpoint the latest. A failed background write is raised on the step
loop at the next save or at `wait`, naming the step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from kmodel.checkpoint.files import CheckpointError


def snapshot(value: Any) -> Any:
    """A copy of a nested state (dicts, lists, tensors, scalars) with every tensor copied to the CPU, so training
    can go on changing the original while the copy is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


class CheckpointWriter:
    def __init__(self, asynchronous: bool):
        self.asynchronous = asynchronous
        self._thread: threading.Thread | None = None
        self._error: tuple[int, BaseException] | None = None
        self._done: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Until the save in flight (if any) is durable; re-raises its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            step, error = self._error
            self._error = None
            if isinstance(error, CheckpointError):
                raise CheckpointError(f"the save of step {step} failed: {error}") from error
            raise error

    def submit(self, step: int, stall_started: float, write: Callable[[], int]) -> None:
        """Run `write` (returns the bytes it wrote) now or on the background thread. `stall_started` is when the
        step loop began this save (before waiting for the previous one and taking the snapshot): the stall is
        the time from then until the step loop goes on (with the write itself, when synchronous)."""
        submitted = time.perf_counter()

        def run() -> None:
            try:
                written = write()
            except BaseException as error:  # handed to the step loop, which raises it
                self._error = (step, error)
                return
            finished = time.perf_counter()
            stall = (submitted if self.asynchronous else finished) - stall_started
            with self._lock:
                self._done.append({"kind": "checkpoint", "step": step, "stall_s": stall, "write_s": finished - submitted,
                                   "bytes": written, "async": self.asynchronous})

        if self.asynchronous:
            self._thread = threading.Thread(target=run, name=f"checkpoint-step-{step}", daemon=False)
            self._thread.start()
        else:
            run()
            self.wait()

    def finished(self) -> list[dict[str, Any]]:
        """Metrics records of the saves completed since the last call."""
        with self._lock:
            done, self._done = self._done, []
        return done
