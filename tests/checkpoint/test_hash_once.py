"""Hash once: a checkpoint's files are hashed while they are written, and the ledger's record is made from those
digests (manifest.json), never by reading the tensor files back."""

from __future__ import annotations

import shutil

import pytest
from test_sharded import save_sharded, trained  # noqa: F401  (the module fixture)

from kmodel import ledger
from kmodel.checkpoint import Manifest, save_checkpoint
from kmodel.checkpoint import files as checkpoint_files
from kmodel.hashing import merkle_root, sorted_weights_sha256
from kmodel.ledger import RECORDED_BASIS, checkpoint_hashes, content_hashes


def no_file_hashing(monkeypatch) -> list[str]:
    """Every sha256-of-a-file the checkpoint and ledger code would compute, recorded instead of read."""
    hashed = []

    def refuse(path):
        hashed.append(str(path))
        raise AssertionError(f"{path} was read back to hash it")

    monkeypatch.setattr(checkpoint_files, "sha256_file", refuse)
    monkeypatch.setattr(ledger, "sha256_file", refuse)
    return hashed


def tensor_files_removed(ckpt, aside):
    """Move every tensor file out of the checkpoint (keeping size and modification time), so any read fails."""
    aside.mkdir()
    moved = sorted(ckpt.glob("*.safetensors"))
    for path in moved:
        shutil.move(path, aside / path.name)
    return moved


def put_back(moved, aside):
    for path in moved:
        shutil.move(aside / path.name, path)


@pytest.mark.parametrize("layout", ["one file", "sharded"])
def test_the_ledger_record_is_made_from_the_digests_taken_while_writing(tmp_path, trained, monkeypatch, layout):  # noqa: F811
    cfg, model, optimizer = trained
    ckpt = tmp_path / "checkpoints" / "step_0000003"
    if layout == "sharded":
        save_sharded(ckpt, cfg, model, optimizer)
    else:
        save_checkpoint(ckpt, model, cfg, state={"step": 3, "optimizer": optimizer.state_dict()})
    hashed = no_file_hashing(monkeypatch)
    moved = tensor_files_removed(ckpt, tmp_path / "aside")
    assert moved  # the record below is made with every tensor file gone and no file hashed
    record = checkpoint_hashes(ckpt)
    assert hashed == []
    monkeypatch.undo()
    put_back(moved, tmp_path / "aside")

    manifest = Manifest.read(ckpt)
    weights = [n for n in sorted(manifest.files) if n.endswith(".safetensors") and not n.startswith("optimizer")]
    if layout == "sharded":
        weights = ["index.json", *weights]
        assert record["model_sha256"] == record["tensor_root"] == manifest.tensor_root
    assert record["hash_basis"] == RECORDED_BASIS
    assert record["weights_sha256"] == merkle_root([manifest.files[n].sha256 for n in weights])
    # a process that did not write the checkpoint (digests forgotten) reads every file and gets the same record
    monkeypatch.setattr(checkpoint_files, "_known_digests", {})
    assert checkpoint_hashes(ckpt) == record


def test_a_changed_moment_changes_the_optimizer_hash(tmp_path, trained):  # noqa: F811
    cfg, model, optimizer = trained
    state = {"step": 3, "optimizer": optimizer.state_dict()}
    save_checkpoint(tmp_path / "a" / "step_0000003", model, cfg, state=state)
    state["optimizer"]["state"][0]["exp_avg"] = state["optimizer"]["state"][0]["exp_avg"] + 1
    save_checkpoint(tmp_path / "b" / "step_0000003", model, cfg, state=state)
    a, b = (checkpoint_hashes(tmp_path / run / "step_0000003") for run in "ab")
    assert a["weights_sha256"] == b["weights_sha256"] and a["rng_sha256"] == b["rng_sha256"]
    assert a["optimizer_sha256"] != b["optimizer_sha256"]


def test_records_made_before_hash_basis_are_checked_by_content(tmp_path, trained):  # noqa: F811
    """A ledger written before the hashes came from the manifest still verifies: its records are recomputed the
    way they were made, by reading the tensors (layout-free content hashes)."""
    cfg, model, optimizer = trained
    ckpt = tmp_path / "step_0000003"
    save_checkpoint(ckpt, model, cfg, state={"step": 3, "optimizer": optimizer.state_dict()})
    old_record = {"kind": "checkpoint", "step": 3, "weights_sha256": "..."}
    old = checkpoint_hashes(ckpt, old_record)
    assert old == content_hashes(ckpt) and "hash_basis" not in old
    state = model.state_dict()
    assert old["weights_sha256"] == sorted_weights_sha256((n, state[n]) for n in sorted(state))
    assert checkpoint_hashes(ckpt, {**old_record, "hash_basis": RECORDED_BASIS})["weights_sha256"] != old["weights_sha256"]
