"""`kmodel launch --launcher torchrun` on a machine without a GPU: 4 CPU ranks (gloo, DS_ACCELERATOR set by
the launcher itself) start a run, a relaunch resumes it, and a run whose checkpoints went missing is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RECIPE = "recipes/tiny-ko-moe.yaml"
TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "data.seq_len=64", "train.micro_batch_size=1",
        "train.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1", "train.warmup_steps=1",
        "parallel.backend=deepspeed",
        "parallel.world_size=4", "parallel.zero_stage=2", "parallel.expert_parallel_size=2"]


def _launch(run_dir, max_steps: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-P", "-m", "kmodel.cli", "launch", RECIPE, "--out", str(run_dir), "--launcher", "torchrun"]
    for s in TINY + [f"train.max_steps={max_steps}"]:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # the launcher must set it itself
    return subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def _steps(run_dir) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_launch_starts_resumes_and_refuses_lost_checkpoints(tmp_path):
    run = tmp_path / "run"
    first = _launch(run, 2)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _steps(run) == [1, 2] and (run / "checkpoints" / "step_0000002").is_dir()
    assert "memory         params" in first.stdout  # the summary shows the ranks' memory records

    again = _launch(run, 4)  # the relaunch continues the run from its checkpoint
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from" in again.stderr and _steps(run) == [1, 2, 3, 4]

    (run / "checkpoints").rename(tmp_path / "elsewhere")  # an unmounted checkpoint folder
    history = (run / "metrics.jsonl").read_bytes()
    lost = _launch(run, 6)
    assert lost.returncode != 0
    assert "cannot resume" in lost.stderr and "checkpoints does not exist" in lost.stderr, lost.stderr[-2000:]
    assert "torchrun" not in lost.stderr  # refused by `kmodel launch` itself, before any rank started
    assert (run / "metrics.jsonl").read_bytes() == history  # nothing already written is lost
