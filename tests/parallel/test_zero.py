"""DeepSpeed ZeRO training through kmodel.parallel.entry on 2 CPU processes (gloo, DS_ACCELERATOR=cpu):
the losses equal one-process training on the same global batch, and checkpoints move between world sizes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kmodel.checkpoint import CheckpointError
from kmodel.config import load_config
from kmodel.train.run import train
from kmodel.train.trainer import Trainer

pytestmark = pytest.mark.distributed

RECIPE = "recipes/tiny-ko-moe.yaml"
TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "data.seq_len=64", "train.micro_batch_size=2",
        "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1"]


def _losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _distributed(run_dir, zero_stage: int, extra: list[str] = (), resume: bool = False) -> None:
    sets = TINY + ["parallel.backend=deepspeed", "parallel.world_size=2", f"parallel.zero_stage={zero_stage}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kmodel.parallel.entry", RECIPE, "--out", str(run_dir), *(["--resume"] if resume else [])]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _single(run_dir, extra: list[str] = (), resume: bool = False) -> None:
    cfg = load_config(RECIPE, TINY + ["train.grad_accum_steps=2", *extra])
    train(cfg, run_dir, resume=resume, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    _single(run_dir)
    return _losses(run_dir)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_one_process(tmp_path, reference, stage):
    _distributed(tmp_path, stage)
    got = _losses(tmp_path)
    assert got.keys() == reference.keys() == {1, 2, 3, 4}
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def _drop_checkpoint(run_dir, step: int) -> None:
    shutil.rmtree(run_dir / "checkpoints" / f"step_{step:07d}")


def test_resume_across_world_sizes(tmp_path, reference):
    """2 processes write step 2; 1 process resumes from it (and writes step 3); 2 processes resume from that.
    Every resumed loss equals the uninterrupted one-process run's."""
    no_ledger = ["provenance.ledger=false"]  # the ledger rightly refuses the history rewinds this test makes
    _distributed(tmp_path, 2, no_ledger)
    _drop_checkpoint(tmp_path, 4)
    _single(tmp_path, ["train.checkpoint_every=1", *no_ledger], resume=True)  # steps 3-4 from the 2-process step 2
    assert _losses(tmp_path) == pytest.approx(reference, rel=1e-5)
    _drop_checkpoint(tmp_path, 4)
    _distributed(tmp_path, 2, ["train.checkpoint_every=1", *no_ledger], resume=True)  # step 4 from the 1-process step 3
    assert _losses(tmp_path) == pytest.approx(reference, rel=1e-5)


def test_checkpoint_of_another_model_is_refused(tmp_path, reference):
    _distributed(tmp_path / "run", 2, ["train.max_steps=2"])
    other = load_config(RECIPE, TINY + ["model.hidden_size=32"])
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        Trainer(other, tmp_path / "other", progress=False).restore(tmp_path / "run")
