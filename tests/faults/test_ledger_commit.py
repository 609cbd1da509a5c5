"""Checkpoint and ledger commit together (issue 17, item 7): the ledger record is the commit point, so a kill
between a checkpoint's rename and its record leaves an honest run that verify and replay pass; a missing or
broken ledger is refused unless --ledger-gap starts a new chain that states the gap."""

from __future__ import annotations

import json

import pytest

from kmodel.checkpoint import list_checkpoints
from kmodel.ledger import chain_problems, checkpoint_records, read_records
from kmodel.provenance.replay import replay, replayable_segments
from kmodel.provenance.verify import FAIL, verify_run
from kmodel.train import RunDirError, train
from kmodel.train.metrics import read_metrics

from conftest import run_killed


def failures(run_dir) -> list[str]:
    return [f"{c.name}: {c.reason}" for c in verify_run(run_dir, check_data=False) if c.status == FAIL]


@pytest.mark.slow
def test_a_kill_between_the_checkpoint_rename_and_its_ledger_record_keeps_verify_and_replay_passing(tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_killed(tiny, run_dir, "record", "8", "--set", "train.eval_every=0", "--set", "train.keep_checkpoints=3")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004", "step_0000008"]  # 8 renamed, unrecorded
    assert [r["step"] for r in checkpoint_records(read_records(run_dir / "ledger.jsonl")[0])] == [4]

    train(None, run_dir, resume=True, progress=False)
    assert (run_dir / "checkpoints" / ".step_0000008.unrecorded").is_dir()  # set aside, not deleted
    records = read_records(run_dir / "ledger.jsonl")[0]
    assert chain_problems(records) == []
    assert [r["step"] for r in checkpoint_records(records)] == [4, 8, 12]
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == list(range(1, 13))
    assert failures(run_dir) == []
    assert replayable_segments(run_dir) == [(0, 4), (4, 4), (8, 4)]  # 4 -> 8 spans the kill
    for from_step, steps in replayable_segments(run_dir):
        (tmp_path / f"replay{from_step}").mkdir()
        assert replay(run_dir, from_step, steps, work_dir=tmp_path / f"replay{from_step}").passed, (from_step, steps)


def test_a_ledger_with_one_edited_byte_is_refused_then_continued_with_a_gap_record(short_run):
    ledger = short_run / "ledger.jsonl"
    ledger.write_text(ledger.read_text().replace('"step":4', '"step":5', 1))
    with pytest.raises(RunDirError, match=r"ledger .* is broken: record 1 \(checkpoint, step 5\): its content does not "
                       r"match its hash .* pass --ledger-gap"):
        train(None, short_run, resume=True, max_steps=10, progress=False)

    train(None, short_run, resume=True, max_steps=10, ledger_gap=True, progress=False)
    [broken] = short_run.glob("ledger.broken-*.jsonl")
    records = read_records(ledger)[0]
    genesis = records[0]
    assert chain_problems(records) == [] and genesis["init_weights_sha256"] is None
    assert genesis["gap"]["resumed_from_step"] == 8 and "its content does not match its hash" in genesis["gap"]["reason"]
    assert genesis["gap"]["previous_ledger"]["path"] == broken.name and len(genesis["gap"]["weights_sha256"]) == 64
    assert [r["step"] for r in checkpoint_records(records)] == [10]
    assert any(c.startswith("init_weights:") and "gap" in c for c in failures(short_run))


def test_a_missing_ledger_is_refused_rather_than_a_new_genesis_of_trained_weights(short_run):
    (short_run / "ledger.jsonl").unlink()
    with pytest.raises(RunDirError, match=r"ledger\.jsonl is missing but the run has checkpoints: a new genesis would "
                       r"record their trained weights as the initial weights.*--ledger-gap"):
        train(None, short_run, resume=True, max_steps=10, progress=False)
    assert not (short_run / "ledger.jsonl").exists()
    train(None, short_run, resume=True, max_steps=10, ledger_gap=True, progress=False)
    genesis = json.loads((short_run / "ledger.jsonl").read_text().splitlines()[0])
    assert genesis["gap"]["previous_ledger"] is None and genesis["init_weights_sha256"] is None


def test_a_resume_from_an_older_checkpoint_keeps_the_chain_valid(short_run):
    """After a fallback to an older checkpoint (the newest failed to load), steps are recorded again."""
    import shutil

    shutil.rmtree(short_run / "checkpoints" / "step_0000008")
    train(None, short_run, resume=True, max_steps=8, progress=False)
    records = read_records(short_run / "ledger.jsonl")[0]
    assert [(r["kind"], r.get("step"), r.get("resumed_from_step")) for r in records[1:]] == [
        ("checkpoint", 4, None), ("checkpoint", 8, None), ("resume", None, 4), ("checkpoint", 8, None)]
    assert chain_problems(records) == []
    assert failures(short_run) == []  # the first record of step 8 is reported as redone, the second checked
    assert replayable_segments(short_run) == [(0, 4), (4, 4)]
    (short_run.parent / "replay").mkdir()
    assert replay(short_run, 4, 4, work_dir=short_run.parent / "replay").passed
