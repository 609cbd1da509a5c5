"""End to end on CPU with the real corpus: learning, the run directory, exact resume after kill -9, atomic
checkpoints, non-finite steps, and clear refusals."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kmodel.checkpoint import CheckpointError, list_checkpoints, load_model, read_state, verify_manifest
from kmodel.config import ConfigError
from kmodel.data import DataError
from kmodel.model import ModelOutput
from kmodel.ledger import chain_problems, checkpoint_records, read_records
from kmodel.rundir import LEDGER_FILE
from kmodel.safe_path import python_command
from kmodel.train import RunDirError, Trainer, TrainingDiverged, train
from kmodel.train.metrics import read_metrics

HERE = Path(__file__).resolve().parent
LOSSES = ("loss", "lm_loss", "mtp_loss", "aux_loss", "z_loss", "grad_norm", "lr")


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def comparable(run_dir: Path) -> list[tuple]:
    """Everything in metrics.jsonl that must not depend on interruptions (timings aside)."""
    out = []
    for r in read_metrics(run_dir):
        if r["kind"] == "train":
            out.append(("train", r["step"], r["tokens"], *(r[k] for k in LOSSES), json.dumps(r["router"])))
        elif r["kind"] == "eval":
            out.append(("eval", r["step"], r["loss"], r["bits_per_byte"], r["final"]))
    return out


def test_loss_goes_down_and_the_run_directory_is_complete(reference_run):
    records = train_records(reference_run)
    assert [r["step"] for r in records] == list(range(1, 13))
    first, last = records[0], records[-1]
    assert first["lm_loss"] == pytest.approx(9.01, abs=0.1)  # ln(8192): uniform over the vocabulary
    assert sum(r["lm_loss"] for r in records[-3:]) / 3 < sum(r["lm_loss"] for r in records[:3]) / 3 - 0.4
    evals = [r for r in read_metrics(reference_run) if r["kind"] == "eval"]
    assert [(e["step"], e["final"]) for e in evals] == [(6, False), (12, True)]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert evals[-1]["perplexity"] == pytest.approx(2.718281828 ** evals[-1]["loss"], rel=1e-6)
    assert set(evals[-1]["files"]) == {str(p) for p in ("data/corpus/heldout/ko_libreoffice_help.jsonl",
                                                        "data/corpus/heldout/en_python_docs.jsonl",
                                                        "data/corpus/heldout/code_python_stdlib.jsonl")}

    assert last["tokens"] == 12 * 4 * 64 and last["mfu"] is None and last["tokens_per_s"] > 0
    assert not any(r["skipped"] for r in records)
    layer = last["router"]["layers.1.mlp"]
    assert sum(layer["load"]) == 4 * 64 * 2  # every token goes to top-2 of the experts
    assert layer["max_over_mean"] >= 1.0 and 0 <= layer["dead_experts"] <= 4

    assert [p.name for p in list_checkpoints(reference_run)] == ["step_0000008", "step_0000012"]
    ckpt = list_checkpoints(reference_run)[-1]
    verify_manifest(ckpt)
    state = read_state(ckpt)
    assert state["step"] == 12 and state["data"]["rows_drawn"] == 48 and state["data"]["stage"] == 0
    assert (ckpt / "tokenizer" / "tokenizer.model").is_file()
    assert "train:" in (reference_run / "config.yaml").read_text()
    for name in ("loss", "lr", "throughput", "expert_load"):
        assert (reference_run / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    summary = (reference_run / "summary.txt").read_text()
    assert "held-out" in summary and str(reference_run / "metrics.jsonl") in summary

    records_in_ledger, _ = read_records(reference_run / LEDGER_FILE)
    assert chain_problems(records_in_ledger) == []
    assert [r["step"] for r in checkpoint_records(records_in_ledger)] == [4, 8, 12]


def run_killed(tiny, run_dir: Path, mode: str, point: str) -> None:
    command = [*python_command(str(HERE / "kill_at.py")), mode, point, "train", str(tiny.recipe), "--out", str(run_dir),
               "--no-progress"]
    for assignment in tiny.overrides:
        command += ["--set", assignment]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_kill_9_then_resume_gives_bit_identical_losses(tiny, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    run_killed(tiny, run_dir, "step", "6")  # dies at the start of step 7; last checkpoint: step 4
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004"]
    assert max(r["step"] for r in read_metrics(run_dir)) == 6  # steps 5-6 must be redone, not duplicated

    train(tiny(), run_dir, resume=True, progress=False)
    assert comparable(run_dir) == comparable(reference_run)
    records, _ = read_records(run_dir / LEDGER_FILE)
    assert chain_problems(records) == [] and [r["kind"] for r in records].count("resume") == 1


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_loadable(tiny, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    run_killed(tiny, run_dir, "save", "step_0000008")
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004"]
    assert any(p.name.startswith(".step_0000008.tmp-") for p in checkpoints.iterdir())  # the torn write
    verify_manifest(checkpoints / "step_0000004")
    load_model(checkpoints / "step_0000004")

    train(tiny(), run_dir, resume=True, progress=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000008", "step_0000012"]
    assert comparable(run_dir) == comparable(reference_run)


def poison_steps(trainer: Trainer, steps: set[int]) -> None:
    """Make the model's loss NaN while the trainer is at one of `steps` (0-based: steps taken so far)."""
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step in steps:
            return ModelOutput(out.logits, out.loss * float("nan"), out.lm_loss, out.mtp_loss, out.aux_loss, out.z_loss)
        return out

    trainer.model.forward = poisoned


def test_a_non_finite_step_is_skipped_and_logged(tiny, tmp_path):
    trainer = Trainer(tiny("provenance.ledger=false"), tmp_path, progress=False)
    poison_steps(trainer, {1})
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    skipped = trainer.train_step()
    assert skipped["skipped"] and skipped["router"] is None and trainer.bad_steps == 1
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name  # no update, no router-bias step
    healthy = trainer.train_step()
    assert not healthy["skipped"] and trainer.bad_steps == 0 and trainer.step == 3
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_too_many_bad_steps_stop_the_run_with_the_last_checkpoint_intact(tiny, tmp_path):
    trainer = Trainer(tiny("provenance.ledger=false", "train.max_bad_steps=3"), tmp_path, progress=False)
    poison_steps(trainer, set(range(5, 100)))
    with pytest.raises(TrainingDiverged, match=r"3 consecutive non-finite steps .* Last good checkpoint: .*step_0000004"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004"]
    verify_manifest(tmp_path / "checkpoints" / "step_0000004")
    assert [r["skipped"] for r in train_records(tmp_path)] == [False] * 5 + [True] * 3
    assert train_records(tmp_path)[-1]["loss"] == "nan"


def test_gradient_accumulation_matches_one_bigger_micro_batch(tiny, tmp_path):
    whole = Trainer(tiny("provenance.ledger=false"), tmp_path / "a", progress=False)
    halves = Trainer(tiny("provenance.ledger=false", "train.micro_batch_size=2", "train.grad_accum_steps=2"),
                     tmp_path / "b", progress=False)
    for _ in range(3):
        a, b = whole.train_step(), halves.train_step()
        assert b["tokens"] == a["tokens"]
        for key in ("loss", "lm_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-4), key


def test_document_masking_trains(tiny, tmp_path):
    trainer = Trainer(tiny("provenance.ledger=false", "data.document_masking=true"), tmp_path, progress=False)
    batch = trainer.data.next_batch(32)  # rows spanning a document boundary get segment 1
    assert batch.segment_ids is not None and int(batch.segment_ids.max()) > 0
    assert trainer.train_step()["skipped"] is False


def test_a_fresh_run_refuses_a_non_empty_directory(tiny, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match=r"is not empty; pass --resume .* or --force"):
        train(tiny(), tmp_path, max_steps=2, progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_resume_refuses_another_recipe_and_changed_data(tiny, reference_run, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.hidden_size: run has 64, now 32"):
        train(tiny("model.hidden_size=32"), reference_run, resume=True, progress=False)

    trainer = Trainer(tiny("provenance.ledger=false", "model.num_experts=8"), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"another model config \(differs in model\.num_experts\)"):
        trainer.restore(reference_run)

    changed = tmp_path / "code.jsonl"
    original = Path("data/corpus/train/code_python_stdlib.jsonl").read_bytes()
    changed.write_bytes(original)
    cfg = tiny(f"data.sources=[{{name: code, path: {changed}}}]", "provenance.ledger=false")
    first = tmp_path / "first"
    train(cfg, first, max_steps=2, progress=False)
    changed.write_bytes(original.replace(b"def ", b"def  ", 1))
    with pytest.raises(DataError, match=rf"the training data changed since: source 'code': {changed} \(changed\)"):
        train(cfg, first, max_steps=4, resume=True, progress=False)


def cli(*args: str) -> int:
    from kmodel.cli import main

    return main(list(args))


def test_bad_recipe_and_bad_data_fail_with_the_culprit_named(tiny, tmp_path, capsys):
    assert cli("train", str(tiny.recipe), "--out", str(tmp_path / "a"), "--set", "train.max_step=1") == 2
    assert "unknown key 'train.max_step'; did you mean 'max_steps'?" in capsys.readouterr().err

    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"text": "좋은 문서"}\n{"text": "끊긴\n', encoding="utf-8")
    code = cli("train", str(tiny.recipe), "--out", str(tmp_path / "b"), "--set", f"data.sources=[{{path: {corrupt}}}]")
    assert code == 2 and f"{corrupt} is corrupt: line 2 is not valid JSON" in capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.touch()
    code = cli("train", str(tiny.recipe), "--out", str(tmp_path / "c"), "--set", f"data.sources=[{{path: {empty}}}]")
    assert code == 2 and f"{empty} is empty" in capsys.readouterr().err

    code = cli("train", str(tiny.recipe), "--out", str(tmp_path / "d"), "--set", "model.vocab_size=4096")
    assert code == 2 and "has vocab_size 8192, larger than the model's model.vocab_size 4096" in capsys.readouterr().err


def test_eval_prints_loss_perplexity_and_bits_per_byte_per_file(reference_run, capsys):
    files = ["data/corpus/heldout/ko_libreoffice_help.jsonl", "data/corpus/heldout/code_python_stdlib.jsonl"]
    assert cli("eval", str(reference_run), "--data", *files, "--max-batches", "2") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in lines] == files
    final = [r for r in read_metrics(reference_run) if r["kind"] == "eval"][-1]
    for result in lines:
        assert result["tokens"] == 2 * 4 * 64
        assert result["loss"] == pytest.approx(final["files"][result["file"]]["loss"], rel=1e-5)
        assert 0 < result["bits_per_byte"] < result["loss"] / 0.69314718 and result["perplexity"] > 1


def test_generate_is_seeded(reference_run, capsys):
    def sample(seed: str) -> str:
        assert cli("generate", str(reference_run), "--prompt", "대화 상자에서", "--max-new-tokens", "12",
                   "--temperature", "1.0", "--seed", seed) == 0
        return capsys.readouterr().out

    first, again, other = sample("1"), sample("1"), sample("2")
    assert first.startswith("대화 상자에서") and first == again and first != other


def test_cached_generation_equals_recomputing_the_whole_sequence(reference_run):
    from kmodel.data import checkpoint_tokenizer
    from kmodel.checkpoint import load_config_from_checkpoint, resolve_checkpoint
    from kmodel.train.generate import generate_ids

    ckpt = resolve_checkpoint(reference_run)
    model = load_model(ckpt)
    tokenizer = checkpoint_tokenizer(ckpt, load_config_from_checkpoint(ckpt))
    text = "셀에 수식을 입력하려면 먼저 셀을 선택한 다음 수식 입력줄에 등호를 입력합니다. 그런 다음 수식을 입력하고 Enter 키를 누릅니다."
    prompt = [tokenizer.eos_id] + tokenizer.encode(text)
    assert len(prompt) > model.cfg.sliding_window  # the sliding layer's cache must drop old keys
    cached = generate_ids(model, prompt, 24, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert cached == ids[len(prompt):]


@pytest.mark.parametrize("command, options", [
    ("train", ["--out", "--max-steps", "--set", "--resume", "--force", "--no-progress"]),
    ("eval", ["--data", "--text-key", "--seq-len", "--batch-size", "--max-batches", "--device"]),
    ("generate", ["--prompt", "--max-new-tokens", "--temperature", "--top-p", "--seed", "--device"]),
    ("demo", ["--out", "--max-steps", "--no-progress"]),
])
def test_help_explains_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(command, "--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text, option
    from kmodel.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in subcommands.choices[command]._actions:
        assert action.help, f"{command}: {action.dest} has no help text"


def test_wandb_is_never_required(tiny, tmp_path, monkeypatch, capsys):
    from kmodel.train.metrics import WandbLog

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    log = WandbLog(tmp_path, tiny("train.wandb.enabled=true"))
    assert log.run is None and "wandb is not installed" in capsys.readouterr().err
    log.write({"step": 1, "loss": 1.0})
    log.close()


@pytest.mark.slow
def test_wandb_logs_offline_into_the_run_directory(tiny, tmp_path):
    pytest.importorskip("wandb")
    train(tiny("train.wandb.enabled=true", "provenance.ledger=false"), tmp_path, max_steps=2, progress=False)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo finds the recipe and corpus from any working directory
    assert cli("demo", "--out", "demo", "--max-steps", "3", "--no-progress") == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "demo"
    assert "[3/3] Korean continuations" in out and "demo/plots" in out
    results = json.loads((run_dir / "heldout_eval.json").read_text())
    assert len(results["files"]) == 3 and results["overall"]["bits_per_byte"] > 0
    assert (run_dir / "samples.txt").read_text(encoding="utf-8").startswith("대화 상자에서")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000003"]
