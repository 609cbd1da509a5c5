"""Asynchronous saves: the step loop goes on while a background thread writes the snapshot; at most one save in
flight; the stall and the write time are in metrics.jsonl; a failed background write is raised, naming its step,
and leaves the previous checkpoint the latest."""

from __future__ import annotations

import time

import pytest

import kmodel.checkpoint.directory as directory
from kmodel.checkpoint import CheckpointError, latest_valid_checkpoint, list_checkpoints
from kmodel.checkpoint.writer import CheckpointWriter
from kmodel.train import Trainer
from kmodel.train.metrics import read_metrics

SLOW_WRITE_S = 0.6


@pytest.fixture
def slow_writes(monkeypatch):
    """Every model file takes SLOW_WRITE_S longer to write, as a large checkpoint on slow storage would."""
    write = directory.write_safetensors

    def slow(path, stream, *args, **kwargs):
        time.sleep(SLOW_WRITE_S)
        return write(path, stream, *args, **kwargs)

    monkeypatch.setattr(directory, "write_safetensors", slow)


def checkpoint_records(run_dir):
    return [r for r in read_metrics(run_dir) if r["kind"] == "checkpoint"]


@pytest.mark.parametrize("asynchronous", [True, False])
def test_stall_and_write_time_are_recorded(tiny, tmp_path, slow_writes, asynchronous):
    cfg = tiny("train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=0",
               f"train.async_checkpoint={str(asynchronous).lower()}", "provenance.ledger=false")
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit()
    records = checkpoint_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6] and all(r["async"] is asynchronous for r in records)
    assert all(r["write_s"] >= 2 * SLOW_WRITE_S and r["bytes"] > 0 for r in records)  # model + optimizer files
    if asynchronous:  # the first save stalled the loop for its snapshot only; later ones also waited for the one
        assert records[0]["stall_s"] < SLOW_WRITE_S  # in flight (a write outlasts two steps here)
        assert all(r["stall_s"] < r["write_s"] + records[i - 1]["write_s"] for i, r in enumerate(records) if i)
    else:  # the loop waited for every file
        assert all(r["stall_s"] >= r["write_s"] for r in records)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000006"]  # keep_checkpoints=2


def test_the_step_loop_trains_while_a_save_is_written(tiny, tmp_path, slow_writes):
    cfg = tiny("train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0", "provenance.ledger=false")
    trainer = Trainer(cfg, tmp_path, progress=False)
    steps_while_writing = []
    take_step = trainer.train_step

    def observed_step():
        if trainer.checkpoint_writer.in_flight:
            steps_while_writing.append(trainer.step)
        return take_step()

    trainer.train_step = observed_step
    trainer.fit()
    assert steps_while_writing and steps_while_writing[0] == 2  # step 3 began while step 2's save was written
    assert latest_valid_checkpoint(tmp_path)[0].name == "step_0000004"


def test_a_failed_background_save_is_raised_and_the_previous_checkpoint_stays_latest(tiny, tmp_path, monkeypatch):
    cfg = tiny("train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=0", "provenance.ledger=false")
    trainer = Trainer(cfg, tmp_path, progress=False)
    write = directory.write_safetensors

    def disk_full_at_step_4(path, stream, *args, **kwargs):
        if "step_0000004" in str(path):
            raise OSError(28, "No space left on device")
        return write(path, stream, *args, **kwargs)

    monkeypatch.setattr(directory, "write_safetensors", disk_full_at_step_4)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002"]
    assert latest_valid_checkpoint(tmp_path)[0].name == "step_0000002"


def test_at_most_one_save_in_flight():
    writer = CheckpointWriter(asynchronous=True)
    running = []

    def write(step):
        def run():
            running.append(("start", step))
            time.sleep(0.2)
            running.append(("end", step))
            return 1
        return run

    for step in (1, 2, 3):
        writer.wait()
        writer.submit(step, time.perf_counter(), write(step))
    writer.wait()
    assert running == [("start", 1), ("end", 1), ("start", 2), ("end", 2), ("start", 3), ("end", 3)]
    assert [r["step"] for r in writer.finished()] == [1, 2, 3] and writer.finished() == []


def test_a_checkpoint_error_in_the_background_names_the_step():
    writer = CheckpointWriter(asynchronous=True)

    def broken():
        raise CheckpointError("model.safetensors: w should be torch.float32 (2,), got nothing")

    writer.submit(7, time.perf_counter(), broken)
    with pytest.raises(CheckpointError, match="the save of step 7 failed: model.safetensors"):
        writer.wait()
