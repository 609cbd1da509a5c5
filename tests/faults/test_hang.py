"""Hangs and stop signals on 2 CPU ranks (gloo; issue 17, items 9 and 11): a rank made to sleep inside a step
stalls its peer in the next all-reduce; both watchdogs fire after train.hang_timeout_s, dump their Python stacks
into the run directory and exit non-zero, and `kmodel launch --max-restarts 1` restarts the run from its newest
checkpoint to the end. SIGTERM to every process makes the ranks agree on one step and checkpoint it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

INJECT = Path(__file__).resolve().parent / "inject"
RECIPE = "recipes/tiny-ko-moe.yaml"
TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "data.seq_len=64", "train.micro_batch_size=1",
        "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1",
        "train.warmup_steps=1", "train.hang_timeout_s=20", "parallel.backend=deepspeed", "parallel.world_size=2",
        "parallel.zero_stage=1"]


def test_a_rank_stuck_in_a_step_dumps_every_rank_and_the_launch_restarts_from_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-P", "-m", "kmodel.cli", "launch", RECIPE, "--out", str(run_dir), "--launcher",
               "torchrun", "--max-restarts", "1"]
    for assignment in TINY:
        command += ["--set", assignment]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(INJECT),
           "KMODEL_TEST_HANG": f"1:2:{tmp_path / 'hung-once'}"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, log
    assert (tmp_path / "hung-once").exists()
    assert "restart 1 of 1, from its newest checkpoint" in done.stderr, log

    reports = {path.name.split(".")[0]: path.read_text() for path in (run_dir / "hang").glob("rank-*.txt")}
    assert sorted(reports) == ["rank-0", "rank-1"], log  # the restarted ranks finished and left no report
    assert "rank 1: no progress for 20 s (train.hang_timeout_s) after step 2" in reports["rank-1"]
    assert "in _train_step" in reports["rank-1"] and "sleep" not in reports["rank-0"]
    assert "all_reduce" in reports["rank-0"]  # the healthy rank waits for its peer in a collective

    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"] == [1, 2, 3, 4]
    assert "resuming from" in done.stderr and (run_dir / "checkpoints" / "step_0000004").is_dir()


def test_sigterm_to_every_rank_checkpoints_the_same_step_and_stops(tmp_path):
    """What SLURM's scancel or preemption does: SIGTERM to every process of the job at once."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-P", "-m", "kmodel.cli", "launch", RECIPE, "--out", str(run_dir), "--launcher",
               "torchrun"]
    for assignment in TINY + ["train.max_steps=200", "train.checkpoint_every=1000"]:
        command += ["--set", assignment]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (run_dir / "metrics.jsonl").is_file() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    [checkpoint] = [p for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")]
    step = int(checkpoint.name.split("_")[1])
    assert 2 <= step < 200 and (checkpoint / "manifest.json").is_file(), stderr[-3000:]
    assert f"stopped by SIGTERM at step {step} with checkpoint" in stderr, stderr[-3000:]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ledger if r["kind"] == "checkpoint"] == [step]
