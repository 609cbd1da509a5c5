"""The ledger on a fake sequence of records: chain, hashes, tampering, resume, batch digests, signing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from provenance_helpers import RECIPE, SMALL_MODEL

from kmodel.checkpoint import save_checkpoint
from kmodel.config import load_config
from kmodel.hashing import object_sha256, weights_sha256
from kmodel.model import build_model
from kmodel.ledger import (
    GENESIS_PREV_HASH,
    SIGNATURE_FILE,
    BatchDigest,
    Ledger,
    LedgerError,
    chain_problems,
    check_signature,
    generate_key,
    load_chain,
    read_records,
    record_hash,
    sign_ledger,
)
from kmodel.rundir import LEDGER_FILE


class FakeTokenizer:
    def fingerprint(self) -> str:
        return "ab" * 32


@pytest.fixture
def small():
    cfg = load_config(RECIPE, SMALL_MODEL + ["model.vocab_size=512", "seed=5"])
    return cfg, build_model(cfg)


def write_fake_run(run_dir: Path, cfg, model, steps=(2, 4)) -> Ledger:
    """A ledger over checkpoints written with made-up batches, losses and optimizer steps."""
    ledger = Ledger.create(run_dir, cfg, model, FakeTokenizer(), {"merkle_root": "00" * 32, "sources": [], "heldout": []})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in steps:
        for _ in range(2):
            ids = torch.randint(0, cfg.model.vocab_size, (2, 8), generator=generator)
            ledger.observe_batch(ids)
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        directory = run_dir / "checkpoints" / f"step_{step:07d}"
        save_checkpoint(directory, model, cfg, state={"step": step, "optimizer": optimizer.state_dict(),
                                                      "rng": {"torch": torch.get_rng_state()}})
        ledger.record_checkpoint(step=step, loss=torch.tensor(3.5 - step / 10), lr=1e-3, grad_norm=0.7,
                                 checkpoint_dir=directory)
    return ledger


def rewrite(run_dir: Path, records: list[dict]) -> None:
    lines = [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in records]
    (run_dir / LEDGER_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_genesis_and_checkpoint_records_chain(tmp_path, small):
    cfg, model = small
    init_hash = weights_sha256(model)
    write_fake_run(tmp_path, cfg, model)
    records = load_chain(tmp_path)
    assert [r["kind"] for r in records] == ["genesis", "checkpoint", "checkpoint"]
    genesis = records[0]
    assert genesis["prev_hash"] == GENESIS_PREV_HASH
    assert genesis["config_sha256"] == cfg.fingerprint()
    assert genesis["seed"] == 5
    assert genesis["init_weights_sha256"] == init_hash
    assert genesis["tokenizer_sha256"] == "ab" * 32
    assert genesis["environment"]["torch"] == torch.__version__
    assert "commit" in genesis["code"]
    for previous, record in itertools.pairwise(records):
        assert record["prev_hash"] == previous["hash"] == record_hash(previous)
    second = records[2]
    manifest = json.loads((tmp_path / "checkpoints/step_0000004/manifest.json").read_text())["files"]
    assert second["model_sha256"] == manifest["model.safetensors"]["sha256"]
    assert second["state_sha256"] == manifest["state.pt"]["sha256"]
    assert second["batches"] == 2 and second["tokens"] == 32
    assert second["loss"] == pytest.approx(3.1) and second["grad_norm"] == 0.7
    assert second["checkpoint"] == "checkpoints/step_0000004"
    assert second["optimizer_sha256"] and second["rng_sha256"] and second["optimizer_sha256"] != records[1]["optimizer_sha256"]
    assert second["weights_sha256"] != records[1]["weights_sha256"]


@pytest.mark.parametrize("tamper, message", [
    (lambda r: r[1].update(loss=0.1), "edited"),
    (lambda r: r.pop(1), "index"),
    (lambda r: r.insert(1, r.pop(2)), "prev_hash"),
    (lambda r: r[0].update(seed=6), "edited"),
])
def test_tampered_records_are_caught(tmp_path, small, tamper, message):
    cfg, model = small
    write_fake_run(tmp_path, cfg, model)
    records, _ = read_records(tmp_path)
    tamper(records)
    problems = chain_problems(records)
    assert any(message in p for p in problems), problems
    rewrite(tmp_path, records)
    with pytest.raises(LedgerError, match="broken"):
        Ledger.open(tmp_path)


def test_rehashed_edit_breaks_the_next_link(tmp_path, small):
    cfg, model = small
    write_fake_run(tmp_path, cfg, model)
    records, _ = read_records(tmp_path)
    records[1]["loss"] = 0.01
    records[1]["hash"] = record_hash(records[1])  # the forger recomputes the edited record's own hash
    problems = chain_problems(records)
    assert len(problems) == 1 and "record 2" in problems[0] and "prev_hash" in problems[0]


def test_resume_appends_and_cuts_a_torn_line(tmp_path, small):
    cfg, model = small
    write_fake_run(tmp_path, cfg, model, steps=(2,))
    (tmp_path / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    with open(tmp_path / LEDGER_FILE, "ab") as f:
        f.write(b'{"kind": "checkpoint", "ste')  # a crash in the middle of a write
    ledger = Ledger.open(tmp_path)
    records = load_chain(tmp_path)
    assert records[-1]["kind"] == "resume"
    assert records[-1]["discarded_torn_bytes"] == len(b'{"kind": "checkpoint", "ste')
    assert records[-1]["last_recorded_step"] == 2
    assert records[-1]["config_sha256"] == cfg.fingerprint()
    ids = torch.arange(16).view(2, 8)
    ledger.observe_batch(ids)
    save_checkpoint(tmp_path / "checkpoints/step_0000003", model, cfg, state={"step": 3})
    ledger.record_checkpoint(step=3, loss=1.0, lr=1e-3, grad_norm=float("nan"), checkpoint_dir=tmp_path / "checkpoints/step_0000003")
    records = load_chain(tmp_path)
    assert records[-1]["step"] == 3 and records[-1]["grad_norm"] == "nan"
    assert records[-1]["optimizer_sha256"] is None  # this state.pt has no optimizer entry


def test_create_refuses_an_existing_ledger(tmp_path, small):
    cfg, model = small
    Ledger.create(tmp_path, cfg, model, None, {})
    with pytest.raises(LedgerError, match="already exists"):
        Ledger.create(tmp_path, cfg, model, None, {})


def test_step_must_increase(tmp_path, small):
    cfg, model = small
    ledger = write_fake_run(tmp_path, cfg, model, steps=(2,))
    ledger.record_checkpoint(step=2, loss=1.0, lr=1.0, grad_norm=1.0, checkpoint_dir=tmp_path / "checkpoints/step_0000002")
    records, _ = read_records(tmp_path)
    assert len(records) == 3
    assert any("does not increase" in p for p in chain_problems(records))


def test_batch_digest_depends_on_ids_order_and_shape():
    def digest(*batches):
        d = BatchDigest()
        for b in batches:
            d.observe(b)
        return d.hexdigest()

    a, b = torch.arange(8).view(2, 4), torch.arange(8, 16).view(2, 4)
    assert digest(a, b) == digest(a.clone(), b.numpy())
    assert digest(a, b) != digest(b, a)
    assert digest(a) != digest(a.view(4, 2))
    changed = a.clone()
    changed[1, 3] = 99
    assert digest(changed, b) != digest(a, b)


def test_weights_hash_ignores_wrapper_prefixes_and_sees_every_bit(small):
    _, model = small
    state = model.state_dict()
    assert weights_sha256(model) == weights_sha256({f"module.{k}": v for k, v in state.items()})
    bumped = {k: v.clone() for k, v in state.items()}
    name = "layers.0.self_attn.q_proj.weight"
    bumped[name][0, 0] = torch.nextafter(bumped[name][0, 0], torch.tensor(1.0))
    assert weights_sha256(bumped) != weights_sha256(state)


def test_object_hash_names_unhashable_state():
    assert object_sha256({"a": [1, 2.0, torch.ones(2)]}) == object_sha256({"a": [1, 2.0, torch.ones(2)]})
    assert object_sha256({"a": [1, 2]}) != object_sha256({"a": (1, 2)})
    with pytest.raises(TypeError, match=r"state\.a\[1\]"):
        object_sha256({"a": [1, object()]})


def test_signature_covers_the_head_and_detects_forgery(tmp_path, small):
    pytest.importorskip("cryptography")
    cfg, model = small
    write_fake_run(tmp_path, cfg, model)
    key = tmp_path / "key.pem"
    public = generate_key(key)
    with pytest.raises(LedgerError, match="already exists"):
        generate_key(key)
    signature = sign_ledger(tmp_path, key)
    records = load_chain(tmp_path)
    assert signature["public_key"] == public and signature["index"] == len(records) - 1
    valid, reason = check_signature(tmp_path, records, public)
    assert valid and "covers all records" in reason
    assert not check_signature(tmp_path, records, "00" * 32)[0]
    forged = [dict(r) for r in records]
    forged[-1]["hash"] = "f" * 64
    assert not check_signature(tmp_path, forged)[0]
    tampered = json.loads((tmp_path / SIGNATURE_FILE).read_text())
    tampered["signature"] = ("0" if tampered["signature"][0] != "0" else "1") + tampered["signature"][1:]
    (tmp_path / SIGNATURE_FILE).write_text(json.dumps(tampered))
    valid, reason = check_signature(tmp_path, records)
    assert not valid and "does not verify" in reason


@pytest.mark.parametrize("recipe", ["recipes/tiny-ko-moe.yaml", "recipes/tiny/gpt-oss.yaml", "recipes/tiny/vaetki.yaml",
                                    "recipes/tiny/deepseek-v3.yaml"])
def test_initial_weights_hash_streams_without_building_the_model(recipe):
    """verify recomputes the genesis hash from a meta-device model one tensor at a time; it must equal the
    hash of the built model (biases, (1 + w) norms, MLA, per-expert draws, buffers included)."""
    from kmodel.ledger import initial_weights_sha256

    cfg = load_config(recipe)
    assert initial_weights_sha256(cfg) == weights_sha256(build_model(cfg))
