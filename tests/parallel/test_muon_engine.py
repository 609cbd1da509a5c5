"""MuonClip through the DeepSpeed trainer on 4 CPU ranks: ZeRO 1, 2, 3 with expert parallelism 4, 2, 1 give the
one-process losses and per-head logits (relative 1e-5) and final Muon matrices (2e-5) with the query/key
rescale active; Muon momenta checkpointed by 4 ranks resume on one process, and back on 4 ranks, with the same
losses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launching import train_ranks

from kmodel.checkpoint import read_state, read_weights
from kmodel.config import load_config
from kmodel.model import build_model
from kmodel.train.optim import uses_muon
from kmodel.train.run import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RECIPE = "recipes/tiny-ko-moe.yaml"
WORLD = 4
TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "data.seq_len=64", "train.max_steps=4",
        "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1",
        "train.optimizer=muon", "train.lr=0.02", "train.qk_clip_tau=0.1", "model.qk_norm=false",
        "provenance.ledger=false"]


def _records(run_dir) -> list[dict]:
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl", encoding="utf-8")) if r["kind"] == "train"]


def _distributed(run_dir, zero_stage: int, ep: int, resume: bool = False) -> None:
    sets = TINY + ["train.micro_batch_size=1", "parallel.backend=deepspeed", f"parallel.world_size={WORLD}",
                   f"parallel.zero_stage={zero_stage}", f"parallel.expert_parallel_size={ep}"]
    train_ranks(run_dir, RECIPE, WORLD, sets, resume=resume)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same global batch of 4 sequences per step."""
    run_dir = tmp_path_factory.mktemp("single")
    train(load_config(RECIPE, TINY + ["train.micro_batch_size=4"]), run_dir, progress=False)
    return run_dir


def _assert_same_run(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3, 4]
    for mine, ref in zip(got, expected):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5), mine["step"]
        for layer, heads in ref["attention_logits"].items():
            assert mine["attention_logits"][layer] == pytest.approx(heads, rel=1e-5), (mine["step"], layer)


@pytest.mark.parametrize(("zero_stage", "ep"), [(1, 4), (2, 2), (3, 1)])
def test_four_ranks_train_like_one_process(tmp_path, reference, zero_stage, ep):
    _distributed(tmp_path, zero_stage, ep)
    expected = _records(reference)
    assert any(max(h) > 0.1 for h in expected[0]["attention_logits"].values())  # MuonClip rescaled something
    _assert_same_run(_records(tmp_path), expected)
    # Every Muon matrix, experts included, took the one-process steps (AdamW or SGD instead would be ~lr apart).
    # The AdamW parameters are left to the losses: Adam turns a gradient element that is zero up to rounding into
    # a full step of either sign, so an embedding element can differ by ~lr with the summation order.
    final = "checkpoints/step_0000004"
    ours, theirs = read_weights(tmp_path / final), read_weights(reference / final)
    assert ours.keys() == theirs.keys()
    cfg = load_config(RECIPE, TINY)
    model = build_model(cfg, "meta", init=False)
    matrices = [n for n, p in model.named_parameters() if uses_muon(n, p, cfg.train)]
    assert any(".experts." in n for n in matrices)
    for name in matrices:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    if (zero_stage, ep) == (2, 2):  # momenta move between topologies: 4 ranks -> 1 process -> 4 ranks
        state = read_state(tmp_path / "checkpoints" / "step_0000002")
        assert sum("momentum_buffer" in entry for entry in state["optimizer"]["state"].values()) == len(matrices)
        shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")
        single = TINY + ["train.micro_batch_size=4", "train.checkpoint_every=1"]
        train(load_config(RECIPE, single), tmp_path, resume=True, progress=False)  # steps 3-4 from step 2
        _assert_same_run(_records(tmp_path), expected)
        shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")
        _distributed(tmp_path, zero_stage, ep, resume=True)  # step 4 from the one-process step 3
        _assert_same_run(_records(tmp_path), expected)

