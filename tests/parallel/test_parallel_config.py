"""parallel: validation, the DeepSpeed config it generates, and `kmodel launch --dry-run`."""

from __future__ import annotations

import subprocess

import pytest

from kmodel.cli import main
from kmodel.config import ConfigError, load_config
from kmodel.parallel.deepspeed_config import deepspeed_config
from kmodel.parallel.entry import parse_args
from kmodel.parallel.launch import render

TINY = "recipes/tiny-ko-moe.yaml"
DS = ["parallel.backend=deepspeed"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.world_size=2"], "need backend: deepspeed"),
        (DS + ["parallel.world_size=4", "parallel.expert_parallel_size=3"], r"expert_parallel_size \(3\) does not divide world_size \(4\)"),
        (DS + ["parallel.world_size=3", "parallel.expert_parallel_size=3", "parallel.zero_stage=1"], r"does not divide model.num_experts \(8\)"),
        (DS + ["parallel.world_size=2", "parallel.global_batch_size=24"], "not divisible by micro_batch_size x data-parallel size = 16"),
        (DS + ["parallel.world_size=2", "parallel.global_batch_size=32"], "set train.grad_accum_steps to 2"),
        (DS + ["parallel.world_size=2", "parallel.expert_parallel_size=2", "parallel.zero_stage=3"], "zero_stage 3 with expert_parallel_size"),
        (DS + ["parallel.world_size=2", "parallel.expert_parallel_size=2"], "expert_parallel_size > 1 needs zero_stage 1 or 2"),
        (DS + ["parallel.zero_stage=2", "parallel.offload_params=true"], "offload_params needs zero_stage 3"),
        (DS + ["parallel.offload_optimizer=true"], "offload_optimizer needs zero_stage 1, 2 or 3"),
        (DS + ["parallel.world_size=4", "parallel.context_parallel_size=3"], r"context_parallel_size \(3\) x pipeline_parallel_size \(1\) = 3 does not divide world_size \(4\)"),
        (DS + ["parallel.world_size=4", "parallel.pipeline_parallel_size=2", "parallel.expert_parallel_size=4", "parallel.zero_stage=1"], r"does not divide the 2 ranks of one pipeline stage"),
        (DS + ["parallel.world_size=4", "parallel.context_parallel_size=4", "data.seq_len=100"], r"8 zigzag chunks, which must divide data.seq_len \(100\)"),
        (DS + ["parallel.world_size=4", "parallel.context_parallel_size=2", "parallel.global_batch_size=24"], r"data-parallel size \(2 = world_size 4 / \(context 2 x pipeline 1\)\)"),
    ],
)
def test_inconsistent_parallel_sections_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_deepspeed_config_from_the_recipe():
    cfg = load_config(TINY, DS + ["parallel.world_size=4", "parallel.zero_stage=3", "parallel.offload_params=true",
                                  "parallel.offload_optimizer=true", "train.grad_accum_steps=3", "train.grad_clip=0.5",
                                  "train.dtype=bf16", "parallel.global_batch_size=96"])
    ds = deepspeed_config(cfg, "cpu")
    assert ds["train_batch_size"] == 96 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    auto = deepspeed_config(load_config(TINY, DS + ["parallel.zero_stage=1"]), "cpu")
    assert auto["bf16"] == {"enabled": False} and "offload_optimizer" not in auto["zero_optimization"]
    assert deepspeed_config(load_config(TINY, DS + ["parallel.zero_stage=1"]), "cuda")["bf16"] == {"enabled": True}


def test_launch_dry_runs(tmp_path, capsys):
    two = ["--set", "parallel.backend=deepspeed", "--set", "parallel.world_size=2", "--set", "parallel.zero_stage=1"]
    assert main(["launch", TINY, "--out", str(tmp_path / "a"), "--dry-run", *two]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("DS_ACCELERATOR=cpu ") and "deepspeed --num_gpus 2 " in line  # this machine has no GPU
    assert "--module kmodel.parallel.entry recipes/tiny-ko-moe.yaml" in line and "--start-or-resume" in line
    assert "--set parallel.world_size=2" in line
    assert main(["launch", TINY, "--out", str(tmp_path / "a"), "--dry-run", "--launcher", "torchrun", *two]) == 0
    assert "torchrun --standalone --nproc_per_node 2 -m kmodel.parallel.entry" in capsys.readouterr().out
    # a new stage on the cluster: every rank is told where the stage starts; a requeued job resumes its own run
    stage = ["--init-from", "old/checkpoints/step_0000004", "--reset-optimizer"]
    assert main(["launch", TINY, "--out", str(tmp_path / "a"), "--dry-run", *two, *stage]) == 0
    assert "--start-or-resume --set parallel.backend=deepspeed --set parallel.world_size=2 --set parallel.zero_stage=1 " \
           "--init-from old/checkpoints/step_0000004 --reset-optimizer" in capsys.readouterr().out
    # DeepSpeed without ZeRO: refused before any rank starts (every rank saves its share of ZeRO's partitions)
    assert main(["launch", TINY, "--out", str(tmp_path / "a"), "--dry-run", *two[:4]]) == 2
    assert "parallel.zero_stage 0 with parallel.backend deepspeed" in capsys.readouterr().err
    assert main(["launch", TINY, "--out", str(tmp_path / "a"), "--dry-run", *two, "--keep-optimizer"]) == 2
    assert "--keep-optimizer / --reset-optimizer go with --init-from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([TINY, "--out", str(tmp_path / "a"), "--reset-optimizer"])
    assert parse_args([TINY, "--out", "x", *stage]).keep_optimizer is False

    recipe = "recipes/moe-30b-a3b-multinode.yaml"
    assert main(["launch", recipe, "--out", str(tmp_path / "b"), "--nodes", "2", "--hosts", "n1,n2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "n1 slots=8\nn2 slots=8\n" in out and "--hostfile" in out and "--master_addr n1" in out
    assert not (tmp_path / "b").exists()  # a dry run writes nothing

    assert main(["launch", recipe, "--out", str(tmp_path / "c"), "--nodes", "2", "--slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    script = out.split("launch.sbatch:\n", 1)[1].rsplit("\nsbatch ", 1)[0]
    for expected in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue", "MASTER_ADDR=",
                     "NCCL_IB_HCA=mlx5", "scontrol requeue", "rsync", "srun"):
        assert expected in script
    assert "{{" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_launch_layout_errors(tmp_path, capsys):
    recipe = "recipes/moe-30b-a3b-multinode.yaml"
    assert main(["launch", recipe, "--out", str(tmp_path), "--nodes", "2", "--gpus-per-node", "4", "--dry-run"]) == 2
    assert "parallel.world_size is 16" in capsys.readouterr().err
    assert main(["launch", recipe, "--out", str(tmp_path), "--nodes", "2", "--dry-run"]) == 2
    assert "needs --hosts, --hostfile or --slurm" in capsys.readouterr().err
    assert main(["launch", recipe, "--out", str(tmp_path), "--nodes", "2", "--hosts", "a", "--dry-run"]) == 2
    assert "names 1 machines but --nodes is 2" in capsys.readouterr().err
    # a layout the code cannot run is refused before anything starts: EP 3 does not divide 8 experts
    ep3 = ["--set", "parallel.backend=deepspeed", "--set", "parallel.world_size=3", "--set", "parallel.zero_stage=1",
           "--set", "parallel.expert_parallel_size=3"]
    assert main(["launch", TINY, "--out", str(tmp_path / "ep"), "--launcher", "torchrun", *ep3]) == 2
    assert "does not divide model.num_experts (8)" in capsys.readouterr().err
    assert not (tmp_path / "ep").exists()
    with pytest.raises(ValueError, match=r"missing values \['b'\]"):
        render("{{a}} {{b}}", {"a": "1"})


@pytest.mark.parametrize(
    "options, message",
    [
        (["--hosts", ""], "'' is not a valid host name"),  # was: a 256-GPU command for one machine
        (["--nodes", "2", "--hosts", "a,,b"], "'' is not a valid host name"),
        (["--master-port", "99999"], "--master-port 99999 is not a TCP port"),
        (["--master-port", "0"], "--master-port 0 is not a TCP port"),
        (["--slurm", "--cpus-per-task", "0"], "--cpus-per-task must be at least 1"),
        (["--gpus-per-node", "0"], "--gpus-per-node must be positive"),
    ],
)
def test_launch_refuses_unusable_options(tmp_path, capsys, options, message):
    recipe = "recipes/k-exaone-236b-a23b-multinode.yaml"
    assert main(["launch", recipe, "--out", str(tmp_path / "run"), "--dry-run", *options]) == 2
    assert message in capsys.readouterr().err


def test_run_state_of_a_launched_directory(tmp_path):
    """What a `--start-or-resume` rank does with its directory (a resume's own checks then refuse history
    without a checkpoint: tests/parallel/test_launch_cpu.py)."""
    from kmodel.parallel.launch import RunStateError, run_state

    run = tmp_path / "run"
    assert run_state(run) == "start"
    run.mkdir()
    assert run_state(run) == "start"
    (run / "notes.txt").write_text("x")
    with pytest.raises(RunStateError, match="has no config.yaml: not a kmodel run directory"):
        run_state(run)
    (run / "notes.txt").unlink()
    (run / "config.yaml").write_text(load_config(TINY).to_yaml())
    assert run_state(run) == "begin"  # prepared by `kmodel launch`, nothing trained
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    assert run_state(run) == "resume"


def test_collective_timeout_follows_the_hang_timeout(monkeypatch):
    """The process group's timeout is the recipe's hang timeout plus a margin, so the watchdog's stack dumps come
    first and a collective never waits a fixed half hour regardless of the recipe."""
    from kmodel.parallel import entry

    seen = {}
    monkeypatch.setattr(entry.dist, "init_process_group", lambda backend, timeout: seen.update(timeout=timeout))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    entry.init_distributed(90)
    assert seen["timeout"].total_seconds() == 90 + entry.COLLECTIVE_TIMEOUT_MARGIN_S
