"""Training in stages: `kmodel train RECIPE --out NEW --init-from OLD/checkpoints/step_N` with a recipe that changes
seq_len, RoPE, data, batch, schedule or layout (never the architecture), the optimizer's moments kept or reset,
and `provenance verify` walking every stage back to genesis through the links in each genesis."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from forgery import rechain

from kmodel.checkpoint import CheckpointError, read_state, save_checkpoint
from kmodel.config import ConfigError
from kmodel.model import build_model
from kmodel.ledger import LedgerError, read_records
from kmodel.provenance.replay import ReplayError, format_result, replay, replayable_segments
from kmodel.provenance.verify import FAIL, PASS, verify_run
from kmodel.rundir import LEDGER_FILE, step_dir_name
from kmodel.train import RunDirError, Trainer, train

# Stage 1 trains at 64 tokens; stage 2 extends to 128 (YaRN x2, another rope_theta, another mixture, batch and
# schedule); stage 3 to 256 (YaRN x4) with fresh optimizer moments. Short runs, one checkpoint every 2 steps.
STAGE_1 = ["data.seq_len=64", "model.max_position_embeddings=64", "train.max_steps=4", "train.checkpoint_every=2",
           "train.eval_every=0", "train.eval_batches=1", "train.keep_checkpoints=5"]
STAGE_2 = [
    "data.seq_len=128", "model.max_position_embeddings=128", "model.rope_theta=20000",
    "model.rope_scaling={factor: 2, original_max_position_embeddings: 64}",
    "data.sources=[{name: ko, path: data/corpus/train/ko_libreoffice_help.jsonl, weight: 0.3}, "
    "{name: code, path: data/corpus/train/code_python_stdlib.jsonl, weight: 0.7}]",
    "train.micro_batch_size=2", "train.schedule=constant", "train.lr=5e-3", "train.max_steps=2",
    "train.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1",
]
STAGE_3 = [
    "data.seq_len=256", "model.max_position_embeddings=256", "model.rope_theta=20000",
    "model.rope_scaling={factor: 4, original_max_position_embeddings: 64}", "train.micro_batch_size=1",
    "train.max_steps=2", "train.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1",
]


def failures(checks):
    return [c for c in checks if c.status == FAIL]


def by_name(checks):
    return {c.name: c for c in checks}


@pytest.fixture(scope="module")
def stage_one(tiny, tmp_path_factory) -> Path:
    """A finished 4-step run at seq_len 64 (checkpoints at steps 2 and 4): the first stage."""
    run = tmp_path_factory.mktemp("stages") / "stage1"
    train(tiny(*STAGE_1), run, progress=False)
    return run


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / step_dir_name(step)


def test_another_architecture_is_refused_key_by_key(tiny, tmp_path):
    other = tiny("model.hidden_size=32", "model.head_dim=8", "model.rope_theta=50000")
    save_checkpoint(tmp_path / "other", build_model(other), other)
    trainer = Trainer(tiny(), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError) as refused:
        trainer.init_from(tmp_path / "other")
    message = str(refused.value)
    assert "model.hidden_size: 32 -> 64" in message and "model.head_dim: 8 -> 16" in message
    assert "rope_theta: 50000" not in message  # a stage may change RoPE: not an architecture difference


def test_rope_and_context_may_change_and_the_weights_are_loaded(tiny, tmp_path):
    short = tiny("model.max_position_embeddings=64", "data.seq_len=64")
    model = build_model(short)
    save_checkpoint(tmp_path / "short", model, short)
    long = tiny("data.seq_len=128", "model.max_position_embeddings=128", "model.rope_theta=40000",
                "model.rope_scaling={factor: 2, original_max_position_embeddings: 64}")
    trainer = Trainer(long, tmp_path / "run", progress=False)
    trainer.init_from(tmp_path / "short")
    for name, tensor in model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    assert trainer.init_source["optimizer"] == "none"  # weights only: nothing to keep
    with pytest.raises(CheckpointError, match="--keep-optimizer: .* holds no optimizer state"):
        Trainer(long, tmp_path / "run2", progress=False).init_from(tmp_path / "short", keep_optimizer=True)


def test_a_stage_keeps_the_moments_under_its_own_hyperparameters(tiny, stage_one, tmp_path):
    source = checkpoint(stage_one, 4)
    saved = read_state(source)["optimizer"]
    new = tiny(*STAGE_2, "train.weight_decay=0.05", "train.beta2=0.99")
    trainer = Trainer(new, tmp_path / "run", progress=False)
    trainer.init_from(source)
    state = trainer.optimizer.state_dict()
    assert trainer.init_source["optimizer"] == "kept" and trainer.step == 0
    for index, entry in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["state"][index][key], entry[key]), (index, key)
    for group in trainer.optimizer.param_groups:  # this recipe's hyperparameters, not the checkpoint's
        assert group["betas"] == (0.9, 0.99) and group["weight_decay"] in (0.05, 0.0)

    reset = Trainer(new, tmp_path / "reset", progress=False)
    reset.init_from(source, keep_optimizer=False)
    assert reset.init_source["optimizer"] == "reset" and not reset.optimizer.state_dict()["state"]


def test_moments_of_another_optimizer_or_grouping_are_refused(tiny, stage_one, tmp_path):
    source = checkpoint(stage_one, 4)
    with pytest.raises(CheckpointError, match="adamw's, and this recipe trains with train.optimizer muon; pass --reset-optimizer"):
        Trainer(tiny(*STAGE_2, "train.optimizer=muon"), tmp_path / "a", progress=False).init_from(source)
    with pytest.raises(CheckpointError, match="groups the parameters differently .*--reset-optimizer"):
        Trainer(tiny(*STAGE_2, "train.decay_embeddings=true"), tmp_path / "b", progress=False).init_from(source)
    Trainer(tiny(*STAGE_2, "train.optimizer=muon"), tmp_path / "c", progress=False).init_from(source, keep_optimizer=False)


def test_optimizer_flags_need_init_from_and_exclude_each_other(tiny, tmp_path):
    from kmodel.cli import build_parser

    with pytest.raises(RunDirError, match="--keep-optimizer and --reset-optimizer .* add --init-from"):
        train(tiny(), tmp_path / "run", progress=False, keep_optimizer=False)
    parser = build_parser()
    assert parser.parse_args(["train", "r.yaml", "--out", "d", "--reset-optimizer"]).keep_optimizer is False
    assert parser.parse_args(["train", "r.yaml", "--out", "d", "--keep-optimizer"]).keep_optimizer is True
    assert parser.parse_args(["train", "r.yaml", "--out", "d"]).keep_optimizer is None
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "r.yaml", "--out", "d", "--keep-optimizer", "--reset-optimizer"])


def test_a_resume_that_changes_the_stage_keys_points_to_init_from(tiny, stage_one):
    from kmodel.train.run import check_resumable, saved_config

    with pytest.raises(ConfigError, match=r"data.seq_len: run has 64, now 128.*--init-from"):
        check_resumable(saved_config(stage_one), tiny(*STAGE_1, "data.seq_len=128", "model.max_position_embeddings=128"),
                        stage_one)


def test_a_stage_refuses_a_broken_or_silent_previous_ledger(tiny, stage_one, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(stage_one, broken)
    lines = (broken / LEDGER_FILE).read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    record["loss"] = 0.5
    (broken / LEDGER_FILE).write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n", encoding="utf-8")
    with pytest.raises(LedgerError, match="a stage cannot link to it"):
        train(tiny(*STAGE_2), tmp_path / "from_broken", progress=False, init_from=checkpoint(broken, 4))

    silent = tmp_path / "silent"  # a checkpoint its run's ledger never recorded
    shutil.copytree(stage_one, silent)
    manifest = checkpoint(silent, 4) / "manifest.json"
    manifest.write_text(manifest.read_text(encoding="utf-8").replace('"step": 4', '"step":  4'), encoding="utf-8")
    with pytest.raises(LedgerError, match="does not record this checkpoint"):
        train(tiny(*STAGE_2), tmp_path / "from_silent", progress=False, init_from=checkpoint(silent, 4))


@pytest.mark.slow
def test_three_stages_verify_back_to_genesis_and_tampering_names_the_stage(tiny, stage_one, tmp_path):
    base = tmp_path / "runs"
    shutil.copytree(stage_one, base / "stage1")
    stage1, stage2, stage3 = base / "stage1", base / "stage2", base / "stage3"
    train(tiny(*STAGE_2), stage2, progress=False, init_from=checkpoint(stage1, 4))
    train(tiny(*STAGE_3), stage3, progress=False, init_from=checkpoint(stage2, 2), keep_optimizer=False)

    genesis = read_records(stage3)[0][0]
    link = genesis["init_from"]["previous_stage"]
    assert link["stage"] == 2 and link["step"] == 2 and link["run_dir"] == str(stage2.resolve())
    assert genesis["init_from"]["optimizer"] == "reset"
    assert genesis["data_manifest"]["order"]["stage"] == 2  # the data's stage index agrees (0-based)

    checks = verify_run(stage3)
    assert not failures(checks), failures(checks)
    named = by_name(checks)
    assert named["history"].status == PASS and named["history"].reason == "from scratch, 3 stages"
    assert named["stage 1 init_weights"].status == PASS and "seed" in named["stage 1 init_weights"].reason
    assert named["stage 1 link"].status == PASS and named["stage 2 link"].status == PASS
    assert named["init_weights"].status == PASS and "stage 2's checkpoint of step 2" in named["init_weights"].reason
    changes_2, changes_3 = named["stage 2 changes"].reason, named["stage 3 changes"].reason
    assert "seq_len: data.seq_len 64 -> 128" in changes_2
    assert "model.rope_theta 10000.0 -> 20000.0" in changes_2 and "model.rope_scaling null -> " in changes_2
    assert "data: data.sources {ko: 0.6, en: 0.25, code: 0.15} -> {ko: 0.3, code: 0.7}" in changes_2
    assert "batch: train.micro_batch_size 4 -> 2" in changes_2
    assert 'schedule: train.lr 0.01 -> 0.005' in changes_2 and 'train.schedule "cosine" -> "constant"' in changes_2
    assert "optimizer moments kept" in changes_2
    assert "seq_len: data.seq_len 128 -> 256" in changes_3 and "model.rope_scaling.factor 2.0 -> 4.0" in changes_3
    assert "optimizer moments reset" in changes_3 and "{ko: 0.3, code: 0.7} -> {ko: 0.6, en: 0.25, code: 0.15}" in changes_3

    # The runs moved together to another place: each stage is found beside the next one.
    moved = tmp_path / "moved"
    shutil.move(base, moved)
    assert not failures(verify_run(moved / "stage3")) and by_name(verify_run(moved / "stage3"))["history"].status == PASS
    shutil.move(moved, base)

    # Stage 1's ledger rewritten consistently after stage 2 started: its own chain holds, the link does not.
    original = (stage1 / LEDGER_FILE).read_bytes()
    records = read_records(stage1)[0]
    records[1]["loss"] = 1.0
    rechain(stage1, records)
    failed = failures(verify_run(stage3))
    assert failed and all(c.name.startswith("stage 1") or c.name == "history" for c in failed), failed
    assert "stage 1 link" in {c.name for c in failed} and "record 2 is not the checkpoint record" in by_name(failed)["stage 1 link"].reason
    (stage1 / LEDGER_FILE).write_bytes(original)

    # Stage 1's checkpoint changed after stage 2 started.
    weights = checkpoint(stage1, 4) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    failed = failures(verify_run(stage3))
    assert [c.name for c in failed] == ["stage 1 checkpoint 4"], failed

    # Stage 1 gone: said so, and the stages present are still verified.
    shutil.rmtree(stage1)
    checks = verify_run(stage3)
    named = by_name(checks)
    assert named["stage 1"].status == FAIL and "is gone" in named["stage 1"].reason
    assert named["history"].status == FAIL and "stage 1" in named["history"].reason
    assert named["stage 2 chain"].status == PASS and named["stage 2 link"].status == PASS


@pytest.mark.slow
def test_a_stage_replays_from_its_step_0_through_the_checkpoint_it_started_from(tiny, stage_one, tmp_path):
    """Replaying a stage from step 0 loads the --init-from checkpoint again (moments kept, as recorded) and gives
    the recorded steps bit for bit; when that checkpoint changed or is gone, the replay says so."""
    source = tmp_path / "stage1"
    shutil.copytree(stage_one, source)
    stage2 = tmp_path / "stage2"
    train(tiny(*STAGE_2), stage2, progress=False, init_from=checkpoint(source, 4))
    assert replayable_segments(stage2) == [(0, 2)]
    result = replay(stage2, 0)
    assert result.bit_exact_expected and result.passed, format_result(result)

    manifest = checkpoint(source, 4) / "manifest.json"
    manifest.write_text(manifest.read_text(encoding="utf-8") + " ", encoding="utf-8")
    with pytest.raises(ReplayError, match="no longer the checkpoint this run started from"):
        replay(stage2, 0)
    assert replayable_segments(stage2) == []
    shutil.rmtree(source)
    with pytest.raises(ReplayError, match=r"--init-from\), which is gone"):
        replay(stage2, 0)


@pytest.mark.slow
def test_a_history_that_starts_from_outside_weights_is_external_in_every_stage(tiny, tmp_path):
    from kmodel.provenance.verify import WARN

    first = tiny(*STAGE_1)
    save_checkpoint(tmp_path / "outside", build_model(first), first)  # weights from no kmodel run: external
    fast = ["train.max_steps=2", "train.checkpoint_every=2", "train.micro_batch_size=1"]
    train(tiny(*STAGE_1, *fast), tmp_path / "stage1", progress=False, init_from=tmp_path / "outside")
    train(tiny(*STAGE_1, *fast, "train.lr=1e-3"), tmp_path / "stage2", progress=False,
          init_from=checkpoint(tmp_path / "stage1", 2))
    named = by_name(verify_run(tmp_path / "stage2", check_data=False))
    assert named["history"].status == WARN and named["history"].reason.startswith("from external weights, 2 stages")
    assert named["stage 1 init_weights"].status == WARN and named["stage 1 link"].status == PASS
    assert "schedule: train.lr 0.01 -> 0.001" in named["stage 2 changes"].reason


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stage_on_two_ranks_continues_the_moments_as_one_process_does(tmp_path):
    """Stage 2 changes the layout (1 process -> 2 ZeRO-1 ranks, or 2 pipeline stages, the same global batch) and
    keeps the moments: its losses are the one-process stage 2's; with the moments reset they are not."""
    from launching import torchrun

    from kmodel.config import load_config

    recipe = "recipes/tiny-ko-moe.yaml"
    base = ["model.hidden_size=64", "model.num_hidden_layers=2", "train.warmup_steps=1", "train.checkpoint_every=2",
            "train.max_steps=2", "train.eval_every=0", "train.eval_batches=1", "train.lr=1e-2"]
    one = ["train.micro_batch_size=2", "train.grad_accum_steps=2"]
    longer = ["data.seq_len=128", "model.max_position_embeddings=128", "model.rope_theta=20000"]
    train(load_config(recipe, base + one + ["data.seq_len=64"]), tmp_path / "stage1", progress=False)
    source = checkpoint(tmp_path / "stage1", 2)

    def losses(run: Path) -> list[float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    train(load_config(recipe, base + one + longer), tmp_path / "single", progress=False, init_from=source)
    train(load_config(recipe, base + one + longer), tmp_path / "reset", progress=False, init_from=source,
          keep_optimizer=False)
    ranks = ["parallel.backend=deepspeed", "parallel.world_size=2", "parallel.zero_stage=1", "train.micro_batch_size=2"]
    args = ["-m", "kmodel.parallel.entry", recipe, "--out", str(tmp_path / "ranks"), "--init-from", str(source)]
    for assignment in base + longer + ranks:
        args += ["--set", assignment]
    torchrun(2, *args, log=tmp_path / "ranks.log")
    # and as 2 pipeline stages, whose optimizer layout is the one-process one the checkpoint records
    pipeline = ["parallel.pipeline_parallel_size=2", "train.grad_accum_steps=2"]
    args = ["-m", "kmodel.parallel.entry", recipe, "--out", str(tmp_path / "stages"), "--init-from", str(source),
            "--keep-optimizer"]
    for assignment in base + longer + ranks + pipeline:
        args += ["--set", assignment]
    torchrun(2, *args, log=tmp_path / "stages.log")

    assert losses(tmp_path / "ranks") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert losses(tmp_path / "stages") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert losses(tmp_path / "reset")[1] != pytest.approx(losses(tmp_path / "single")[1], rel=1e-5)
    named = by_name(verify_run(tmp_path / "ranks", check_data=False))
    assert named["history"].reason == "from scratch, 2 stages"
    changes = named["stage 2 changes"].reason
    assert "layout: parallel.backend \"none\" -> \"deepspeed\"" in changes and "parallel.world_size 1 -> 2" in changes
    assert "batch: train.grad_accum_steps 2 -> 1" in changes and "optimizer moments kept" in changes
