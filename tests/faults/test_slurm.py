"""The SLURM template (issue 17, item 5): every path taken literally, and a stage-out that never leaves a
partial checkpoint under a final name nor keeps checkpoints that training rotated away. The rendered script's
own shell code runs here in bash, on temporary directories, with SLURM's variables set by hand."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from kmodel.config import load_config
from kmodel.parallel import launch
from kmodel.rundir import checkpoint_dirs

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("flock") is None,
                                reason="needs bash and flock (util-linux)")

HOSTILE = "my run's dir/$(touch PWNED) `touch PWNED`"


def rendered(run_dir: Path, local: Path, recipe: str = "recipes/tiny ko.yaml") -> str:
    cfg = load_config("recipes/tiny-ko-moe.yaml", ["parallel.backend=deepspeed", "parallel.world_size=2",
                                                    "parallel.zero_stage=1"])
    plan = launch.LaunchPlan(1, 2, recipe, str(run_dir), ["train.lr=1e-3", "name=a b"])
    return launch.slurm_script(plan, cfg, time_limit="1:00:00", partition=None, ib_hca="mlx5",
                               socket_ifname="^lo,docker", local_staging=str(local), cpus_per_task=4)


def bash(script: str, cwd: Path, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_JOB_ID": "77"}
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


def test_every_path_and_argument_is_taken_literally(tmp_path):
    script = rendered(tmp_path / HOSTILE, tmp_path / "local scratch")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert f'#SBATCH --output="{tmp_path / HOSTILE}/slurm-%j.out"' in script
    lines = [line for line in script.splitlines() if re.match(r"(SHARED_RUN|LOCAL_RUN|TRAIN)=", line)]
    done = bash("\n".join(lines) + '\nprintf "%s\\n" "$SHARED_RUN" "$LOCAL_RUN" "${TRAIN[@]}"', tmp_path)
    assert done.returncode == 0, done.stderr
    words = done.stdout.splitlines()
    assert words[:2] == [str(tmp_path / HOSTILE), str(tmp_path / "local scratch" / "77")]
    assert words[words.index("--out") - 1] == "recipes/tiny ko.yaml" and words[-1] == "name=a b"
    assert not list(tmp_path.rglob("PWNED"))


def stage_out_function(script: str) -> str:
    return re.search(r"^stage_out\(\) \{\n.*?^\}\n", script, re.S | re.M).group(0)


def make_checkpoint(folder: Path, step: int, size: int = 1000) -> Path:
    ckpt = folder / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.safetensors", "manifest.json"):
        (ckpt / name).write_bytes(bytes([step % 256]) * size)
    return ckpt


@pytest.fixture
def runs(tmp_path):
    shared, local = tmp_path / HOSTILE, tmp_path / "local scratch" / "77"
    make_checkpoint(shared / "checkpoints", 2)  # rotated away locally since the last stage-out
    make_checkpoint(shared / "checkpoints", 4)
    for step in (4, 8, 12):
        make_checkpoint(local / "checkpoints", step)
    (local / "checkpoints" / ".step_0000016.tmp-123").mkdir()  # being written
    (local / "metrics.jsonl").write_text('{"step": 12}\n')
    (local / "ledger.jsonl").write_text("{}\n")
    (local / "plots").mkdir()
    (local / "plots" / "loss.png").write_bytes(b"png")
    (local / ".lock").write_text("pid 1")
    return shared, local, rendered(shared, tmp_path / "local scratch")


def run_stage_out(script: str, shared: Path, local: Path, cwd: Path, path_prefix: Path | None = None):
    program = "set -euo pipefail\n" + stage_out_function(script) + "stage_out\n"
    return bash(f"SHARED_RUN={shlex.quote(str(shared))} LOCAL_RUN={shlex.quote(str(local))}\n" + program, cwd, path_prefix)


def test_stage_out_copies_new_checkpoints_and_deletes_rotated_ones(runs, tmp_path):
    shared, local, script = runs
    done = run_stage_out(script, shared, local, tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == ["step_0000004", "step_0000008", "step_0000012"]
    assert (shared / "checkpoints" / "step_0000012" / "model.safetensors").read_bytes() == bytes([12]) * 1000
    assert (shared / "metrics.jsonl").read_text() == '{"step": 12}\n' and (shared / "plots" / "loss.png").is_file()
    assert not (shared / ".lock").exists() and not [p for p in shared.iterdir() if p.name.startswith(".")]

    shutil.rmtree(local / "checkpoints" / "step_0000004")  # training rotates again
    make_checkpoint(local / "checkpoints", 16)
    assert run_stage_out(script, shared, local, tmp_path).returncode == 0
    assert [p.name for p in checkpoint_dirs(shared)] == ["step_0000008", "step_0000012", "step_0000016"]


def test_a_preemption_mid_copy_leaves_no_partial_checkpoint_under_a_final_name(runs, tmp_path):
    shared, local, script = runs
    shim, real_cp = tmp_path / "shim", shutil.which("cp")
    shim.mkdir()
    # `cp` killed by the preemption after the first file of step_0000012's copy
    (shim / "cp").write_text(f'#!/bin/bash\nif [[ "$*" == *step_0000012* ]]; then mkdir -p "${{@: -1}}"; '
                             f'{real_cp} "${{@: -2:1}}/model.safetensors" "${{@: -1}}/"; kill -9 $$; fi\n'
                             f'exec {real_cp} "$@"\n')
    (shim / "cp").chmod(0o755)
    done = run_stage_out(script, shared, local, tmp_path, path_prefix=shim)
    assert done.returncode != 0
    assert [p.name for p in checkpoint_dirs(shared)] == ["step_0000002", "step_0000004", "step_0000008"]
    assert (shared / "checkpoints" / ".step_0000012.partial-77").is_dir()  # invisible to resume and listing

    done = run_stage_out(script, shared, local, tmp_path)  # the next stage-out starts that copy over
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == ["step_0000004", "step_0000008", "step_0000012"]
    assert len(list((shared / "checkpoints" / "step_0000012").iterdir())) == 3
