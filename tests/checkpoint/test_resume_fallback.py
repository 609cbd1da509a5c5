"""`--resume` never trains on unverified weights: a damaged latest checkpoint is skipped with a warning and the
run continues from the newest one that verifies, with the losses of an uninterrupted run."""

from __future__ import annotations

import pytest

from kmodel.checkpoint import MODEL_FILE, OPTIMIZER_FILE
from kmodel.train import RunDirError, train
from kmodel.train.metrics import read_metrics


def losses(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_resume_skips_a_corrupt_latest_checkpoint_and_reaches_the_same_losses(tiny, tmp_path, capsys):
    cfg = tiny("train.max_steps=8", "train.eval_every=0", "train.keep_checkpoints=3")
    reference = tmp_path / "reference"
    train(cfg, reference, progress=False)

    damaged = tmp_path / "damaged"
    train(cfg, damaged, progress=False, max_steps=8)
    flip_last_byte(damaged / "checkpoints" / "step_0000008" / MODEL_FILE)
    capsys.readouterr()
    train(cfg, damaged, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipping step_0000008" in err and "model.safetensors does not match its recorded sha256" in err
    assert "resuming from" in err and "step_0000004" in err
    assert losses(damaged) == losses(reference)
    moved = [p.name for p in (damaged / "checkpoints").iterdir() if p.name.startswith(".step_0000008.aside-")]
    assert len(moved) == 1  # the damaged copy was kept, out of the way of the new step 8


@pytest.mark.slow
def test_resume_refuses_when_no_checkpoint_verifies(tiny, tmp_path):
    cfg = tiny("train.max_steps=4", "train.eval_every=0")
    run_dir = tmp_path / "run"
    train(cfg, run_dir, progress=False)
    (run_dir / "checkpoints" / "step_0000004" / OPTIMIZER_FILE).unlink()
    with pytest.raises(RunDirError, match="none of its 1 checkpoints verifies"):
        train(tiny("train.max_steps=8", "train.eval_every=0"), run_dir, resume=True, progress=False)
