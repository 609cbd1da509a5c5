"""Nothing is loaded unverified: a damaged, incomplete or foreign checkpoint is named, and a run falls back to the
newest checkpoint that verifies (issues 15 and 17, items 2 and 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kmodel.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_model,
    read_state,
    read_weights,
    save_checkpoint,
    verify_checkpoint,
)
from kmodel.config import load_config
from kmodel.model import build_model
from kmodel.rundir import RunDir, checkpoint_dirs
from kmodel.train.optim import build_optimizer

SMALL = ["model.vocab_size=101", "model.hidden_size=32", "model.head_dim=8", "model.intermediate_size=48",
         "model.moe_intermediate_size=16", "model.num_hidden_layers=2", "model.sliding_window_pattern=LG"]


@pytest.fixture(scope="module")
def trained():
    cfg = load_config("recipes/tiny-ko-moe.yaml", SMALL)
    model = build_model(cfg).train()
    optimizer = build_optimizer(model, cfg.train)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, ids).loss.backward()
    optimizer.step()
    return cfg, model, optimizer


def save_run(run_dir, trained, steps=(2, 4, 6)):
    cfg, model, optimizer = trained
    for step in steps:
        save_checkpoint(run_dir / "checkpoints" / f"step_{step:07d}", model, cfg,
                        state={"step": step, "optimizer": optimizer.state_dict()})
    return [run_dir / "checkpoints" / f"step_{step:07d}" for step in steps]


def flip_byte(path, offset_from_end=5):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_clean_run_verifies_and_records_its_run_id(tmp_path, trained):
    ckpts = save_run(tmp_path, trained)
    run_id = RunDir(tmp_path).read_run_id()
    assert run_id and all(json.loads((c / MANIFEST_FILE).read_text())["run_id"] == run_id for c in ckpts)
    assert latest_valid_checkpoint(tmp_path) == (ckpts[-1], [])
    manifest = verify_checkpoint(ckpts[-1], run_id=run_id, need_state=True)
    assert manifest.step == 6 and set(manifest.files) >= {MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, "config.yaml"}


@pytest.mark.parametrize("damage, reason", [
    (lambda c: flip_byte(c / MODEL_FILE), "model.safetensors does not match its recorded sha256"),
    (lambda c: flip_byte(c / OPTIMIZER_FILE), "optimizer.safetensors does not match its recorded sha256"),
    (lambda c: flip_byte(c / STATE_FILE, 40), "state.pt does not match its recorded sha256"),
    (lambda c: (c / MODEL_FILE).write_bytes((c / MODEL_FILE).read_bytes()[:-100]), r"model.safetensors is truncated"),
    (lambda c: (c / MANIFEST_FILE).unlink(), "incomplete: no manifest.json"),
    (lambda c: (c / STATE_FILE).unlink(), "state.pt is missing"),
    (lambda c: (c / OPTIMIZER_FILE).unlink(), "optimizer.safetensors is missing"),
    (lambda c: (c / MODEL_FILE).unlink(), "model.safetensors is missing"),
    (lambda c: (c / MANIFEST_FILE).write_text("{not json"), "manifest.json is unreadable"),
])
def test_damage_is_named_and_the_newest_good_checkpoint_is_used(tmp_path, trained, damage, reason):
    ckpts = save_run(tmp_path, trained)
    damage(ckpts[-1])
    with pytest.raises(CheckpointError, match=reason):
        verify_checkpoint(ckpts[-1], need_state=True)
    found, skipped = latest_valid_checkpoint(tmp_path)
    assert found == ckpts[-2]
    assert [p for p, _ in skipped] == [ckpts[-1]] and reason.split(" ")[0] in skipped[0][1]


def test_every_reader_refuses_a_corrupt_file(tmp_path, trained):
    ckpt = save_run(tmp_path, trained, steps=(2,))[0]
    flip_byte(ckpt / MODEL_FILE)
    for read in (lambda: load_model(ckpt), lambda: read_weights(ckpt, lazy=True)):
        with pytest.raises(CheckpointError, match=f"{ckpt}: model.safetensors does not match"):
            read()
    flip_byte(ckpt / MODEL_FILE)  # restored: the state still reads, and a flipped state byte is refused
    flip_byte(ckpt / STATE_FILE, 40)
    with pytest.raises(CheckpointError, match="state.pt does not match"):
        read_state(ckpt)


def test_load_model_of_a_run_falls_back_and_says_why(tmp_path, trained, capsys):
    ckpts = save_run(tmp_path, trained)
    flip_byte(ckpts[-1] / MODEL_FILE)
    model = load_model(tmp_path)
    assert "skipping step_0000006" in capsys.readouterr().err
    _, source, _ = trained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_a_checkpoint_from_another_run_is_skipped(tmp_path, trained):
    mine = save_run(tmp_path / "mine", trained)
    theirs = save_run(tmp_path / "theirs", trained, steps=(8,))[0]
    shutil.copytree(theirs, tmp_path / "mine" / "checkpoints" / theirs.name)  # a consistent copy: manifest and all
    found, skipped = latest_valid_checkpoint(tmp_path / "mine")
    assert found == mine[-1]
    assert "written by another run" in skipped[0][1]


def test_a_state_without_its_moments_is_refused_not_a_keyerror_in_adam(tmp_path, trained):
    cfg, model, optimizer = trained
    ckpt = tmp_path / "step_0000002"
    save_checkpoint(ckpt, model, cfg, state={"step": 2, "optimizer": optimizer.state_dict()})
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    del manifest["files"][OPTIMIZER_FILE]  # the moments dropped from the manifest as well as from disk
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    (ckpt / OPTIMIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match="no moments for entries"):
        read_state(ckpt)


def test_an_incomplete_step_directory_is_moved_aside_not_blocking_the_save(tmp_path, trained, capsys):
    cfg, model, optimizer = trained
    ckpts = save_run(tmp_path, trained, steps=(2,))
    stale = tmp_path / "checkpoints" / "step_0000004"
    stale.mkdir()
    (stale / "config.yaml").write_text("partial")  # a step directory without weights or manifest
    assert list_checkpoints(tmp_path) == ckpts and latest_valid_checkpoint(tmp_path)[0] == ckpts[0]
    save_checkpoint(stale, model, cfg, state={"step": 4, "optimizer": optimizer.state_dict()})
    assert "moved" in capsys.readouterr().err
    aside = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".step_0000004.aside-")]
    assert len(aside) == 1 and (aside[0] / "config.yaml").read_text() == "partial"  # nothing deleted
    assert checkpoint_dirs(tmp_path) == [ckpts[0], stale] and latest_valid_checkpoint(tmp_path)[0] == stale
    with pytest.raises(CheckpointError, match="already exists and verifies"):
        save_checkpoint(stale, model, cfg)


def test_a_format_1_manifest_still_reads(tmp_path, trained):
    """Checkpoints written before manifests recorded sizes and run ids: a flat file -> sha256 map."""
    ckpt = save_run(tmp_path, trained, steps=(2,))[0]
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    (ckpt / MANIFEST_FILE).write_text(json.dumps({name: r["sha256"] for name, r in files.items()}, indent=1))
    assert latest_valid_checkpoint(tmp_path)[0] == ckpt
    load_model(ckpt)
    flip_byte(ckpt / MODEL_FILE)
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        load_model(ckpt)


def test_a_lost_run_id_file_is_restored_from_the_run_s_own_checkpoints(tmp_path, trained):
    ckpts = save_run(tmp_path, trained, steps=(2, 4))
    run_id = RunDir(tmp_path).read_run_id()
    RunDir(tmp_path).run_id_file.unlink()
    save_run(tmp_path, trained, steps=(6,))
    assert RunDir(tmp_path).read_run_id() == run_id  # adopted, not a new id that would disown steps 2 and 4
    (ckpts[0].parent / "step_0000006").rename(ckpts[0].parent / ".step_0000006.gone")
    assert latest_valid_checkpoint(tmp_path)[0] == ckpts[-1]


def test_ranks_split_the_verification_and_agree(tmp_path, trained, monkeypatch):
    """Two ranks (threads here) hash every file once between them; a damaged file seen by one rank makes both
    skip that checkpoint."""
    import threading
    from collections import Counter

    import kmodel.checkpoint.files as files
    from kmodel.checkpoint import SharedVerification

    ckpts = save_run(tmp_path, trained, steps=(2, 4))
    files._known_digests.clear()
    hashed = Counter()
    real = files.sha256_file

    def counting(path):
        hashed[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(files, "sha256_file", counting)
    votes, decided = [], {}

    def decide():  # runs once per round, when both ranks have voted
        decided["all"] = all(votes)
        votes.clear()

    barrier = threading.Barrier(2, action=decide)

    def all_ok(ok):  # what an all-reduce over the ranks gives
        votes.append(ok)
        barrier.wait()
        return decided["all"]

    flip_byte(ckpts[-1] / STATE_FILE, 40)
    found = {}

    def rank(r):
        found[r] = latest_valid_checkpoint(tmp_path, share=SharedVerification(r, 2, all_ok))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found[0][0] == found[1][0] == ckpts[0]  # both skipped step 4, whichever rank hashed state.pt
    assert any("state.pt does not match" in reason for _, reason in found[0][1] + found[1][1])
    assert hashed[MODEL_FILE] == 2 and hashed[OPTIMIZER_FILE] == 2  # once per checkpoint, not once per rank
