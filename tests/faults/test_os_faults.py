"""Operating-system faults during training (issue 17, item 9): stop signals checkpoint and say how to resume;
a short disk rotates old checkpoints first or stops before writing; a write error is one line."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmodel.checkpoint import list_checkpoints
from kmodel.train import RunDirError, Trainer, train
from kmodel.train import trainer as trainer_module
from kmodel.train import watch
from kmodel.train.metrics import read_metrics

from conftest import train_args


def train_until_signal(tiny, run_dir: Path, signum: int) -> subprocess.CompletedProcess:
    """`kmodel train` for 40 steps (checkpoints only at the end), sent `signum` once step 3 is logged."""
    args = train_args(tiny, run_dir, "--set", "train.max_steps=40", "--set", "train.checkpoint_every=100",
                      "--set", "train.eval_every=0")
    process = subprocess.Popen([sys.executable, "-P", "-m", "kmodel.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while max((r["step"] for r in read_metrics(run_dir)), default=0) < 3:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.2)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_checkpoints_after_the_step_and_says_how_to_resume(tiny, tmp_path, signum):
    run_dir = tmp_path / "run"
    done = train_until_signal(tiny, run_dir, signum)
    assert done.returncode == 128 + signum, done.stderr
    [checkpoint] = list_checkpoints(run_dir)
    step = int(checkpoint.name.split("_")[1])
    assert 3 <= step < 40
    assert (f"stopped by {signal.Signals(signum).name} at step {step} with checkpoint {checkpoint}; "
            f"continue with: kmodel train --resume --out {run_dir}") in done.stderr
    assert "Traceback" not in done.stderr
    trainer = train(None, run_dir, resume=True, max_steps=step + 2, progress=False)
    assert trainer.step == step + 2
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == list(range(1, step + 3))


shutil_usage = type(shutil.disk_usage("/"))


def fake_disk(monkeypatch, run_dir: Path, capacity: int) -> None:
    """A file system of `capacity` bytes holding only the run's checkpoints."""
    def disk_usage(path):
        used = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())
        return shutil_usage(capacity, used, max(capacity - used, 0))

    monkeypatch.setattr(watch.shutil, "disk_usage", disk_usage)


def test_a_short_disk_rotates_old_checkpoints_before_saving(tiny, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(tiny("train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.eval_every=0"),
          run_dir, progress=False)
    size = watch.directory_bytes(list_checkpoints(run_dir)[-1])
    fake_disk(monkeypatch, run_dir, int(3.5 * size))  # room for 3 checkpoints, not for a 4th before rotation
    on_disk_while_writing = []
    write = trainer_module.save_checkpoint

    def counting_write(directory, *args, **kwargs):
        on_disk_while_writing.append(len(list_checkpoints(run_dir)))
        return write(directory, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", counting_write)
    train(None, run_dir, resume=True, max_steps=6, progress=False)
    assert on_disk_while_writing == [2, 2]  # without rotating first: [3, 3], a 4th checkpoint on a full disk
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004", "step_0000005", "step_0000006"]


def test_a_disk_without_room_for_one_checkpoint_stops_before_writing(tiny, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(tiny("train.max_steps=4", "train.eval_every=0"), run_dir, progress=False)
    size = watch.directory_bytes(list_checkpoints(run_dir)[-1])
    fake_disk(monkeypatch, run_dir, int(1.5 * size))
    with pytest.raises(watch.InsufficientSpace, match=r"not enough disk space for the next checkpoint in .*: about "
                       r".* GB needed, .* GB free; the newest checkpoint, .*step_0000004, is kept\. Free space, then "
                       r"rerun with --resume"):
        train(None, run_dir, resume=True, max_steps=8, progress=False)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_write_error_during_a_save_is_one_line(tiny, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.checkpoints_dir / ".step_0000004.tmp-1"))

    monkeypatch.setattr(Trainer, "save_checkpoint", full)
    with pytest.raises(RunDirError, match=r"no space left on the device of .*\.step_0000004\.tmp-1; no checkpoint was "
                       r"completed yet\. Free space \(or lower train\.keep_checkpoints\), then rerun with --resume"):
        train(tiny("train.max_steps=4", "train.eval_every=0"), run_dir, progress=False)
