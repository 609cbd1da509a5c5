"""Pipeline parallelism (kmodel.parallel.pipeline) on CPU gloo ranks: the losses equal one process's on the same
global batch for PP 2, PP 2 x DP 2 (interleaved schedule) and PP 2 x EP 2; a checkpoint written by PP 2 resumes
in one process and on PP 4; a rank whose experts get no token does not hang the pipeline; bad layouts are
refused."""

from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
import torch
import torch.distributed as dist
from launching import spawn_ranks, train_ranks

from kmodel.config import ConfigError, load_config
from kmodel.model import build_model
from kmodel.parallel import expert_parallel as xp
from kmodel.parallel.mesh import Mesh, build_groups
from kmodel.parallel.pipeline import (Carried, Chunk, PipelineLoss, check_engine_layout, keep_chunks, make_schedule,
                                      stage_chunks)
from kmodel.parallel.pipeline_split import PipelineSplitError, check_pipeline
from kmodel.train.run import train

RECIPE = "recipes/tiny-ko-moe.yaml"
# 4 layers: layer 0 dense, 1-3 MoE (first_k_dense_replace 1), one MTP depth (on the last stage); documents masked
# (their boundaries travel between the stages)
TINY = ["model.hidden_size=64", "model.num_hidden_layers=4", "data.seq_len=64", "data.document_masking=true",
        "train.micro_batch_size=2", "train.max_steps=4", "train.warmup_steps=1", "train.checkpoint_every=2",
        "train.eval_every=0", "train.eval_batches=1", "train.grad_accum_steps=2", "provenance.ledger=false"]
PIPELINE = ["parallel.backend=deepspeed", "parallel.zero_stage=1", "parallel.pipeline_parallel_size=2"]


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if r["kind"] == "train"}


class Losses(dict):
    """Step -> loss of a run, remembering the run directory."""

    def __init__(self, run_dir):
        super().__init__(_losses(run_dir))
        self.run_dir = run_dir


def _single(run_dir, accumulation: int, resume: bool = False) -> Losses:
    train(load_config(RECIPE, TINY + [f"train.grad_accum_steps={accumulation}"]), run_dir, resume=resume, progress=False)
    return Losses(run_dir)


@pytest.fixture(scope="module")
def reference4(tmp_path_factory):
    """One process, 2 x 2 rows per step: the global batch of one pipeline accumulating 2 micro-batches of 2."""
    return _single(tmp_path_factory.mktemp("single4"), 2)


@pytest.fixture(scope="module")
def reference8(tmp_path_factory):
    """One process, 4 x 2 rows per step: the global batch of two data-parallel pipelines."""
    return _single(tmp_path_factory.mktemp("single8"), 4)


def _assert_same(got: dict[int, float], reference: dict[int, float]) -> None:
    assert got.keys() == reference.keys() == {1, 2, 3, 4}
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory):
    """PP 2 on 2 ranks, 1F1B, layers split 1 | 3 (stage 0: the embedding and the dense layer only, so the aux loss
    it passes on carries no gradient); checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("pp2") / "run"
    train_ranks(run, RECIPE, 2, TINY + PIPELINE + ["parallel.world_size=2", "parallel.pipeline_layers=[1,3]"])
    return run


def _resume_copy(run, tmp_path):
    """A copy of the run that has only its step-2 checkpoint."""
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_0000004")
    return copy


@pytest.mark.distributed
@pytest.mark.slow
def test_pp2_uneven_split_matches_one_process_and_resumes_in_one(pp2_run, tmp_path, reference4):
    _assert_same(_losses(pp2_run), reference4)
    train_records = [r for r in _records(pp2_run) if r["kind"] == "train"]
    assert list(train_records[0]["router"]) == ["layers.1.mlp", "layers.2.mlp", "layers.3.mlp", "mtp.0.block.mlp"]
    # the clip's norm covers both stages (DeepSpeed's norm is ~2e-5 from torch's, with or without stages)
    single = {r["step"]: r["grad_norm"] for r in _records(reference4.run_dir) if r["kind"] == "train"}
    for r in train_records:
        assert r["grad_norm"] == pytest.approx(single[r["step"]], rel=1e-4), r["step"]

    # the final held-out evaluation runs through the stages too
    assert _final_eval(pp2_run) == pytest.approx(_final_eval(reference4.run_dir), rel=1e-5)

    resumed = _single(_resume_copy(pp2_run, tmp_path), 2, resume=True)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference4[step], rel=1e-5), step


def _final_eval(run_dir) -> float:
    return next(r["loss"] for r in _records(run_dir) if r["kind"] == "eval" and r["final"])


@pytest.mark.distributed
@pytest.mark.slow
def test_pp2_checkpoint_resumes_with_pp4(pp2_run, tmp_path, reference4):
    """The step-2 checkpoint of PP 2 (2 micro-batches of 2 rows) resumes on 4 stages of one layer each (4
    micro-batches of 1 row: the same global batch) with the same losses."""
    copy = _resume_copy(pp2_run, tmp_path)
    train_ranks(copy, RECIPE, 4, TINY + PIPELINE + ["parallel.world_size=4", "parallel.pipeline_parallel_size=4",
                                                    "train.micro_batch_size=1", "train.grad_accum_steps=4"], resume=True)
    resumed = _losses(copy)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference4[step], rel=1e-5), step


@pytest.mark.distributed
@pytest.mark.slow
def test_pp2_dp2_interleaved_matches_one_process(tmp_path, reference8):
    """4 ranks: 2 stages x 2 data-parallel pipelines, the interleaved schedule with 2 chunks per stage."""
    sets = PIPELINE + ["parallel.world_size=4", "parallel.pipeline_schedule=interleaved_1f1b",
                       "parallel.pipeline_virtual_stages=2"]
    train_ranks(tmp_path, RECIPE, 4, TINY + sets)
    _assert_same(_losses(tmp_path), reference8)
    assert _final_eval(tmp_path) == pytest.approx(_final_eval(reference8.run_dir), rel=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_pp2_ep2_matches_one_process(tmp_path, reference8):
    """4 ranks: 2 stages, each with 2 data-parallel ranks that shard the experts (EP 2 inside the stage), the decoder
    layers recomputed in backward (activation checkpointing, the experts' all-to-all included)."""
    train_ranks(tmp_path, RECIPE, 4, TINY + PIPELINE + ["parallel.world_size=4", "parallel.expert_parallel_size=2",
                                                        "train.activation_checkpointing=true"])
    _assert_same(_losses(tmp_path), reference8)


@pytest.mark.distributed
@pytest.mark.slow
def test_pp2_dp4_ep2_shards_expert_state_within_stages(tmp_path):
    """8 ranks: 2 stages of 4 data-parallel ranks, EP 2 inside each: the expert optimizer's state is sharded over
    expert-data-parallel pairs of one stage (their place in the pair, not in the world, picks the piece)."""
    reference = _single(tmp_path / "single16", 8)
    run = tmp_path / "pp2dp4ep2"
    train_ranks(run, RECIPE, 8, TINY + PIPELINE + ["parallel.world_size=8", "parallel.expert_parallel_size=2"])
    _assert_same(_losses(run), reference)


# --- a rank whose experts get no token: the pipeline's all-to-alls still pair up ---------------------------------

IDLE = ["model.hidden_size=64", "model.num_hidden_layers=3", "data.seq_len=32", "train.micro_batch_size=2",
        "train.grad_accum_steps=2", "parallel.backend=deepspeed", "parallel.world_size=4", "parallel.zero_stage=1",
        "parallel.pipeline_parallel_size=2", "parallel.expert_parallel_size=2", "parallel.pipeline_layers=[2,1]"]


def _skew(model) -> None:
    """Every token prefers experts 0..3, held by expert-parallel rank 0: rank 1's experts stay idle."""
    with torch.no_grad():
        for moe in model.moe_layers().values():
            moe.gate.e_score_correction_bias[:4] = 10.0


def _ids(cfg) -> torch.Tensor:
    """The global batch: 2 data-parallel pipelines x 2 micro-batches x 2 rows."""
    return torch.randint(0, cfg.model.vocab_size, (8, cfg.data.seq_len), generator=torch.Generator().manual_seed(3))


def _idle_worker(rank: int, world: int, out: str) -> None:
    cfg = load_config(RECIPE, IDLE)
    mesh = Mesh.from_config(cfg.parallel)
    coords, built = mesh.coords(rank), build_groups(mesh, rank)
    groups = xp.make_groups(2, built)
    chunks = stage_chunks(check_pipeline(cfg), 2, coords.stage)
    model = build_model(cfg, experts=xp.local_experts(cfg.model.num_experts, groups),
                        keep=partial(keep_chunks, chunks=chunks))
    xp.attach_expert_parallel(model, groups)
    _skew(model)
    carried = Carried(embeds=True, segments=False)
    loss = PipelineLoss(model, carried, micro_batches=2)
    schedule = make_schedule(cfg, model, chunks, carried, loss, torch.device("cpu"), built["pipeline"])
    ids = _ids(cfg)[coords.data * 4:(coords.data + 1) * 4]  # this pipeline's 2 micro-batches of 2 rows
    if coords.stage == 0:
        schedule.step(ids, return_outputs=False)
    else:
        schedule.step(target=ids, return_outputs=False)
    xp.synchronize_router_load(model, built["replica"])
    result = {"loads": {n: m.load.clone() for n, m in model.moe_layers().items()}}  # every expert's count
    if coords.stage == 1:
        total = torch.stack([t["loss"] for t in loss.terms]).mean()
        dist.all_reduce(total, group=built["replica"])
        result["loss"] = total / 2
    else:
        grad = model.embed_tokens.weight.grad.clone()
        dist.all_reduce(grad, group=built["replica"])
        result["embed_grad"] = grad / 2
    if coords.data == 0:
        torch.save(result, f"{out}.{coords.stage}")


@pytest.mark.distributed
@pytest.mark.slow
def test_idle_expert_rank_does_not_hang_the_pipeline(tmp_path):
    out = str(tmp_path / "pp2ep2.pt")
    spawn_ranks(_idle_worker, 4, out)  # fails naming the ranks if the pipeline hung

    cfg = load_config(RECIPE, IDLE)
    model = build_model(cfg)
    _skew(model)
    micro_batches = _ids(cfg).split(2)
    total = sum(model(ids, ids).loss for ids in micro_batches) / len(micro_batches)
    total.backward()
    first, last = torch.load(f"{out}.0", weights_only=True), torch.load(f"{out}.1", weights_only=True)
    torch.testing.assert_close(last["loss"], total.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(first["embed_grad"], model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-7)
    for name, moe in model.moe_layers().items():
        held = {**first["loads"], **last["loads"]}[name]  # counts of every expert, summed over the pipelines
        torch.testing.assert_close(held, moe.load)
        assert held[4:].sum() == 0 and held[:4].sum() > 0, name  # expert-parallel rank 1 really got nothing


# --- stages in one process ---------------------------------------------------------------------------------------

def test_stage_models_partition_the_model_and_their_chunks_compose_to_its_loss():
    """Each stage's model holds exactly its layers under the one-process names and values; running the chunks one
    after the other (what the schedule does across ranks) gives the one-process loss terms."""
    cfg = load_config(RECIPE, TINY + ["data.seq_len=32", "parallel.pipeline_layers=[1,3]"]
                      + PIPELINE + ["parallel.world_size=2"])
    whole = build_model(cfg)
    split = check_pipeline(cfg)
    stages = [build_model(cfg, keep=partial(keep_chunks, chunks=stage_chunks(split, 2, s))) for s in range(2)]
    names = [set(stage.state_dict()) for stage in stages]
    assert not names[0] & names[1] and names[0] | names[1] == set(whole.state_dict())
    assert "embed_tokens.weight" in names[0] and "layers.1.mlp.gate.weight" in names[1] and "mtp.0.eh_proj.weight" in names[1]
    for stage in stages:
        for name, tensor in stage.state_dict().items():
            torch.testing.assert_close(tensor, whole.state_dict()[name], rtol=0, atol=0, msg=name)

    ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    segments = torch.cat([torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 20, dtype=torch.long)], dim=1)
    carried = Carried(embeds=True, segments=True)
    loss = PipelineLoss(stages[1], carried, micro_batches=1)
    first, last = (Chunk(stage, stage_chunks(split, 2, s)[0], carried) for s, stage in enumerate(stages))
    loss(last(*first(ids, segments)), ids)
    expected = whole(ids, ids, segment_ids=segments)
    for key, value in loss.terms[0].items():
        torch.testing.assert_close(value, getattr(expected, key).detach(), rtol=1e-6, atol=0, msg=key)


# --- bad input -------------------------------------------------------------------------------------------------

def _cfg(*sets: str):
    return load_config(RECIPE, TINY + PIPELINE + ["parallel.world_size=2", *sets])


def test_more_stages_than_layers_is_refused():
    with pytest.raises(PipelineSplitError, match=r"pipeline_parallel_size \(2\).*num_hidden_layers \(1\)"):
        check_pipeline(_cfg("model.num_hidden_layers=1"))


def test_too_few_micro_batches_for_the_schedule_are_refused():
    with pytest.raises(PipelineSplitError, match=r"grad_accum_steps \(1 micro-batches\).*grad_accum_steps >= 2"):
        check_pipeline(_cfg("train.grad_accum_steps=1"))


def test_a_stage_without_layers_is_refused():
    with pytest.raises(PipelineSplitError, match=r"pipeline_layers\[1\] is 0"):
        check_pipeline(_cfg("parallel.pipeline_layers=[4,0]"))


@pytest.mark.parametrize("setting, named", [
    ("parallel.zero_stage=2", "parallel.zero_stage 2"),
    ("model.tie_word_embeddings=true", "model.tie_word_embeddings"),
    ("train.optimizer=muon", "train.optimizer muon"),
])
def test_what_the_engine_does_not_do_is_refused(setting, named):
    with pytest.raises(ConfigError, match=named):
        check_engine_layout(_cfg(setting))
