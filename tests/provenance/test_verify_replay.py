"""verify and replay on a real tiny training run: a clean run passes, every kind of tampering fails."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from forgery import rechain

from kmodel.checkpoint import read_state, read_weights, save_checkpoint
from kmodel.config import config_from_dict
from kmodel.model import build_model
from kmodel.ledger import (
    Ledger,
    checkpoint_hashes,
    read_records,
)
from kmodel.provenance.replay import (
    ReplayError,
    random_segments,
    replay,
    replayable_segments,
)
from kmodel.provenance.verify import FAIL, PASS, SKIP, WARN, verify_run
from kmodel.rundir import LEDGER_FILE


def by_name(checks):
    return {c.name: c for c in checks}


def failures(checks):
    return [c for c in checks if c.status == FAIL]


def test_clean_run_verifies(trained_run):
    run_dir, data_root = trained_run
    checks = verify_run(run_dir, data_root=data_root)
    assert not failures(checks), failures(checks)
    named = by_name(checks)
    for name in ("chain", "config", "init_weights", "data", "checkpoint 2", "checkpoint 4", "checkpoint 6",
                 "unrecorded", "metrics"):
        assert named[name].status == PASS, named[name]
    assert named["signature"].status == SKIP
    assert named["code"].status in (PASS, WARN)
    assert any(c.name.startswith("tokenizer step_") and c.status == PASS for c in checks)


def test_edited_record_fails_the_chain(run_copy):
    run_dir, data_root = run_copy
    lines = (run_dir / LEDGER_FILE).read_text().splitlines()
    record = json.loads(lines[2])
    record["loss"] = record["loss"] / 2
    lines[2] = json.dumps(record)
    (run_dir / LEDGER_FILE).write_text("\n".join(lines) + "\n")
    failed = by_name(failures(verify_run(run_dir, check_init=False, data_root=data_root)))
    assert set(failed) == {"chain", "metrics"}  # metrics.jsonl still holds the true loss
    assert "edited" in failed["chain"].reason


def test_swapped_checkpoint_fails(run_copy):
    run_dir, data_root = run_copy
    ckpts = run_dir / "checkpoints"
    # a consistent swap: step 4's weights replaced by step 2's, and its manifest rewritten to match
    shutil.copy(ckpts / "step_0000002" / "model.safetensors", ckpts / "step_0000004" / "model.safetensors")
    manifest = json.loads((ckpts / "step_0000002" / "manifest.json").read_text())
    own = json.loads((ckpts / "step_0000004" / "manifest.json").read_text())
    own["files"]["model.safetensors"] = manifest["files"]["model.safetensors"]
    (ckpts / "step_0000004" / "manifest.json").write_text(json.dumps(own, indent=1))
    failed = failures(verify_run(run_dir, check_init=False, data_root=data_root))
    assert [c.name for c in failed] == ["checkpoint 4"]
    assert "model_sha256" in failed[0].reason and "weights_sha256" in failed[0].reason


def test_checkpoint_from_another_run_fails(run_copy):
    run_dir, data_root = run_copy
    cfg = config_from_dict(read_records(run_dir)[0][0]["config"])
    target = run_dir / "checkpoints" / "step_0000006"
    shutil.rmtree(target)
    save_checkpoint(target, build_model(cfg.model_copy(update={"seed": 99})), cfg, state={"step": 6})
    failed = failures(verify_run(run_dir, check_init=False, data_root=data_root))
    assert [c.name for c in failed] == ["checkpoint 6"]
    assert "optimizer_sha256" in failed[0].reason


def test_changed_data_shard_fails(run_copy):
    run_dir, data_root = run_copy
    with open(data_root / "data" / "code.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    failed = failures(verify_run(run_dir, check_init=False, data_root=data_root))
    assert [c.name for c in failed] == ["data"] and "code.jsonl (changed)" in failed[0].reason


def test_init_not_derived_from_the_seed_fails(run_copy):
    run_dir, data_root = run_copy
    records, _ = read_records(run_dir)
    cfg = config_from_dict(records[0]["config"])
    # a forger starts the ledger from weights that are not the seed's and rewrites the chain consistently
    foreign = build_model(cfg.model_copy(update={"seed": cfg.seed + 1}))
    scratch = run_dir.parent / "scratch"
    Ledger.create(scratch, cfg, foreign, None, records[0]["data_manifest"])
    records[0]["init_weights_sha256"] = read_records(scratch)[0][0]["init_weights_sha256"]
    rechain(run_dir, records)
    checks = verify_run(run_dir, data_root=data_root)
    assert [c.name for c in failures(checks)] == ["init_weights"]
    assert by_name(checks)["chain"].status == PASS


def test_unrecorded_checkpoint_and_config_edits_fail(run_copy):
    run_dir, data_root = run_copy
    shutil.copytree(run_dir / "checkpoints" / "step_0000006", run_dir / "checkpoints" / "step_0000008")
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.003", "lr: 0.004"))
    names = {c.name for c in failures(verify_run(run_dir, check_init=False, data_root=data_root))}
    assert names == {"unrecorded", "config"}


def test_pruned_checkpoints_are_skipped_not_failed(run_copy):
    run_dir, _ = run_copy
    shutil.rmtree(run_dir / "checkpoints" / "step_0000002")
    checks = verify_run(run_dir, check_init=False, check_data=False)
    assert by_name(checks)["checkpoint 2"].status == SKIP
    assert not failures(checks)
    assert replayable_segments(run_dir) == [(0, 2), (4, 2)]


def test_replay_is_bit_exact_on_cpu(trained_run):
    run_dir, data_root = trained_run
    threads = torch.get_num_threads()
    from_seed = replay(run_dir, 0, 2, data_root=data_root)
    assert torch.get_num_threads() == threads  # the recorded thread count is used during the replay only
    assert from_seed.bit_exact_expected and from_seed.passed
    middle = replay(run_dir, 2, 4, data_root=data_root)
    assert [c.step for c in middle.comparisons] == [4, 6]
    assert middle.passed, middle.as_dict()
    assert all(all(c.matches.values()) and c.weight_distance == 0.0 for c in middle.comparisons)


def test_replay_catches_a_forged_record(run_copy):
    run_dir, data_root = run_copy
    records, _ = read_records(run_dir)
    step4 = next(r for r in records if r.get("step") == 4)
    step4["grad_norm"] = step4["grad_norm"] * 1.01
    rechain(run_dir, records)
    result = replay(run_dir, 2, data_root=data_root)
    assert not result.passed
    assert [k for k, ok in result.comparisons[0].matches.items() if not ok] == ["grad_norm"]


def test_replay_catches_weights_not_trained_from_the_previous_checkpoint(run_copy):
    run_dir, data_root = run_copy
    # the forger nudges step 4's weights and re-records everything about them consistently
    target = run_dir / "checkpoints" / "step_0000004"
    cfg = config_from_dict(read_records(run_dir)[0][0]["config"])
    model = build_model(cfg, init=False)
    weights = read_weights(target)
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1.001
    model.load_state_dict(weights)
    state = read_state(target)
    shutil.rmtree(target)
    save_checkpoint(target, model, cfg, state=state)
    records, _ = read_records(run_dir)
    step4 = next(r for r in records if r.get("step") == 4)
    step4.update(checkpoint_hashes(target))
    rechain(run_dir, records)
    assert not failures(verify_run(run_dir, check_init=False, data_root=data_root))  # every hash is consistent...
    result = replay(run_dir, 2, 2, data_root=data_root)  # ...but training does not produce those weights
    assert not result.passed and not result.comparisons[0].matches["weights_sha256"]
    assert result.comparisons[0].matches["batch_digest"] and result.comparisons[0].weight_distance > 0


def test_replay_rejects_segments_that_do_not_exist(trained_run):
    run_dir, data_root = trained_run
    with pytest.raises(ReplayError, match=r"step 3 is not a recorded checkpoint; recorded steps: \[2, 4, 6\]"):
        replay(run_dir, 3, 1, data_root=data_root)
    with pytest.raises(ReplayError, match="must end at one of"):
        replay(run_dir, 2, 3, data_root=data_root)
    with pytest.raises(ReplayError, match="no checkpoint was recorded after step 6"):
        replay(run_dir, 6, 2, data_root=data_root)
    drawn = random_segments(run_dir, 2, seed=1)
    assert len(drawn) == 2 and set(drawn) <= {(0, 2), (2, 2), (4, 2)}


def test_tolerance_mode_for_a_run_recorded_on_another_device(run_copy):
    run_dir, data_root = run_copy
    records, _ = read_records(run_dir)
    records[0]["environment"]["device"] = "cuda:0"  # as if recorded on a GPU: no bit-exactness to expect
    rechain(run_dir, records)
    result = replay(run_dir, 2, 2, data_root=data_root)
    comparison = result.comparisons[0]
    assert not result.bit_exact_expected
    assert comparison.tolerance == pytest.approx(1e-6)  # two CPU replays agree exactly: only the floor is left
    assert comparison.weight_distance == 0.0 and result.passed
