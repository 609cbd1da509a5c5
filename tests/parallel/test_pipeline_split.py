"""The pipeline layer split: optimal against brute force, uneven where the model is, overridable, refusing bad input."""

from __future__ import annotations

import itertools

import pytest

from kmodel.config import load_config
from kmodel.parallel.pipeline_split import (
    PipelineSplitError,
    bubble_fraction,
    check_pipeline,
    chunk_pieces,
    micro_batches_in_flight,
    split_layers,
    stage_pieces,
)
from kmodel.plan import (
    Assumptions,
    model_flops_per_token,
    model_pieces,
    parameter_counts,
    pieces_memory,
    uses_fused_loss,
)

DEEPSEEK = "recipes/deepseek-v3-671b-a37b.yaml"
AXK1 = "recipes/ax-k1-519b-a33b.yaml"
KEXAONE = "recipes/k-exaone-236b-a23b-multinode.yaml"
LAYOUT = ["parallel.backend=deepspeed", "parallel.world_size=256", "parallel.zero_stage=1",
          "parallel.expert_parallel_size=8", "train.micro_batch_size=1", "train.grad_accum_steps=16",
          "parallel.pipeline_parallel_size=1", "parallel.pipeline_schedule=1f1b", "parallel.pipeline_virtual_stages=1"]


def _cfg(recipe: str, *overrides: str):
    return load_config(recipe, [*LAYOUT, *overrides])


def _chunk_time(chunk) -> float:
    return sum(p.flops_per_token for p in chunk)


def _chunk_memory(cfg, chunk, index: int, stages: int) -> float:
    """What kmodel.plan charges a GPU holding this chunk, with the micro-batches 1F1B keeps on its stage."""
    in_flight = micro_batches_in_flight(stages, 1, index, cfg.train.grad_accum_steps)
    return pieces_memory(cfg, cfg.parallel.world_size // stages, Assumptions.for_config(cfg), chunk,
                         fused_loss=uses_fused_loss(cfg), in_flight=in_flight).total


def _counts(split) -> list[int]:
    return [len(r) for r in split]


def test_pieces_add_up_to_the_models_counts_and_flops():
    for recipe in (DEEPSEEK, AXK1, KEXAONE):
        cfg = _cfg(recipe)
        pieces, counts = model_pieces(cfg), parameter_counts(cfg.model)
        assert sum(p.dense for p in pieces) == counts.dense
        assert sum(p.expert for p in pieces) == counts.expert
        seq = cfg.model.max_position_embeddings if cfg.data is None else cfg.data.seq_len
        assert sum(p.flops_per_token for p in pieces) == pytest.approx(model_flops_per_token(cfg.model, seq), rel=1e-12)


@pytest.mark.parametrize("recipe, stages", [(DEEPSEEK, 4), (KEXAONE, 8), (AXK1, 2)])
def test_split_is_the_fastest_and_then_the_smallest_by_brute_force(recipe, stages):
    """12 layers: every way to cut them into `stages` non-empty chunks, timed and sized by the planner's pieces."""
    cfg = _cfg(recipe, "model.num_hidden_layers=12", "model.mlp_layer_types=null", "model.layer_types=null")
    n = 12

    def evaluate(counts):
        bounds = [0, *itertools.accumulate(counts)]
        split = [range(a, b) for a, b in itertools.pairwise(bounds)]
        chunks = stage_pieces(cfg, split, stages)  # one chunk per stage
        return (max(_chunk_time(c) for c in chunks),
                max(_chunk_memory(cfg, c, i, stages) for i, c in enumerate(chunks)))

    every = [[b - a for a, b in itertools.pairwise((0, *cuts, n))] for cuts in itertools.combinations(range(1, n), stages - 1)]
    scores = {tuple(c): evaluate(c) for c in every}
    fastest = min(t for t, _ in scores.values())
    least_memory = min(m for t, m in scores.values() if t <= fastest * (1 + 1e-12))
    chosen = _counts(split_layers(cfg, stages))
    time, memory = scores[tuple(chosen)]
    assert time == pytest.approx(fastest, rel=1e-12)
    assert memory == pytest.approx(least_memory, rel=1e-9)


def test_deepseek_v3_dense_layers_and_the_heavy_last_chunk_are_balanced():
    cfg = _cfg(DEEPSEEK, "model.max_position_embeddings=4096", "model.rope_scaling=null")
    split = split_layers(cfg, 16)
    counts = _counts(split)
    assert sum(counts) == 61 and split[0].start == 0 and split[-1].stop == 61
    assert all(a.stop == b.start for a, b in itertools.pairwise(split))
    # the first chunk's 3 dense layers are cheaper than MoE layers: it takes more of them than the last chunk,
    # which also runs the 129280-word head twice (main + MTP) and the MTP block
    assert counts[0] > counts[-1]
    times = [_chunk_time(c) for c in chunk_pieces(cfg, split)]
    moe_layer = model_pieces(cfg)[1 + 3].flops_per_token
    assert max(times) - min(times) < 2 * moe_layer  # within a couple of layers of even
    assert split == split_layers(cfg, 16)  # deterministic


def test_ax_k1_61_layers_uneven_over_4_stages_and_interleaved():
    cfg = _cfg(AXK1, "model.max_position_embeddings=8192")
    counts = _counts(split_layers(cfg, 4))
    assert sum(counts) == 61 and min(counts) >= 1 and counts[-1] < max(counts)
    interleaved = split_layers(cfg, 4, 2)
    assert len(interleaved) == 8 and sum(_counts(interleaved)) == 61
    stages = stage_pieces(cfg, interleaved, 4)
    # stage s holds chunks s and s + 4: stage 0 has the embedding and layers of chunk 0 and chunk 4
    names = [p.name for p in stages[0]]
    assert names[0] == "embedding" and f"layers.{interleaved[4].start}" in names
    assert [p.name for p in stages[3]][-2:] == ["mtp.0", "head"]


def test_memory_limit_moves_layers_off_the_stage_that_keeps_most_micro_batches():
    cfg = _cfg(KEXAONE, "train.activation_checkpointing=false")
    stages = 4
    free = split_layers(cfg, stages)
    memories = [_chunk_memory(cfg, c, i, stages) for i, c in enumerate(stage_pieces(cfg, free, stages))]
    limit = memories[0] * 0.9  # stage 0 keeps 4 micro-batches in flight: the tightest
    bounded = split_layers(cfg, stages, memory_limit=limit)
    assert all(_chunk_memory(cfg, c, i, stages) <= limit for i, c in enumerate(stage_pieces(cfg, bounded, stages)))
    assert len(bounded[0]) < len(free[0])
    # what cannot fit anywhere gives the unbounded split back
    assert split_layers(cfg, stages, memory_limit=1.0) == free


def test_recipe_split_overrides_and_is_validated():
    cfg = _cfg(KEXAONE, "parallel.pipeline_parallel_size=4", "parallel.pipeline_layers=[12,12,12,12]")
    assert check_pipeline(cfg) == [range(12), range(12, 24), range(24, 36), range(36, 48)]
    with pytest.raises(PipelineSplitError, match=r"sum to 47, not model.num_hidden_layers \(48\); adjust the counts by \+1"):
        split_layers(_cfg(KEXAONE, "parallel.pipeline_layers=[12,12,12,11]"), 4)
    with pytest.raises(PipelineSplitError, match=r"pipeline_layers\[1\] is 0: every chunk needs at least one layer"):
        split_layers(_cfg(KEXAONE, "parallel.pipeline_layers=[24,0,12,12]"), 4)
    with pytest.raises(PipelineSplitError, match="has 3 entries for 4 chunks"):
        split_layers(_cfg(KEXAONE, "parallel.pipeline_layers=[16,16,16]"), 4)


def test_bad_layouts_are_refused_with_numbers_and_a_fix():
    with pytest.raises(PipelineSplitError, match=r"pipeline_parallel_size \(64\) exceed model.num_hidden_layers \(48\)"):
        split_layers(_cfg(KEXAONE), 64)
    with pytest.raises(PipelineSplitError, match=r"16 stages x 4 virtual stages = 64 chunks exceed .* at most 12 stages"):
        split_layers(_cfg(KEXAONE), 16, 4)
    pp4 = ["parallel.pipeline_parallel_size=4"]
    with pytest.raises(PipelineSplitError, match=r"pipeline_virtual_stages \(2\) needs parallel.pipeline_schedule"):
        check_pipeline(_cfg(KEXAONE, *pp4, "parallel.pipeline_virtual_stages=2"))
    with pytest.raises(PipelineSplitError, match="set pipeline_virtual_stages >= 2 or pipeline_schedule=1f1b"):
        check_pipeline(_cfg(KEXAONE, *pp4, "parallel.pipeline_schedule=interleaved_1f1b"))
    with pytest.raises(PipelineSplitError, match=r"grad_accum_steps \(2 micro-batches\) is fewer than .* \(4\)"):
        check_pipeline(_cfg(KEXAONE, *pp4, "train.grad_accum_steps=2"))
    interleaved = [*pp4, "parallel.pipeline_schedule=interleaved_1f1b", "parallel.pipeline_virtual_stages=2"]
    with pytest.raises(PipelineSplitError, match=r"\(6 micro-batches\) is not a multiple of .* \(4\).*grad_accum_steps=4"):
        check_pipeline(_cfg(KEXAONE, *interleaved, "train.grad_accum_steps=6"))
    assert len(check_pipeline(_cfg(KEXAONE, *interleaved, "train.grad_accum_steps=8"))) == 8


def test_schedule_arithmetic():
    assert bubble_fraction(4, 1, 16) == 3 / 16
    assert bubble_fraction(4, 2, 16) == 3 / 32
    assert bubble_fraction(1, 1, 1) == 0
    # 1F1B: stage i starts p - i forwards before its first backward (fewer when there are fewer micro-batches)
    assert [micro_batches_in_flight(4, 1, i, 16) for i in range(4)] == [4, 3, 2, 1]
    assert micro_batches_in_flight(4, 1, 0, 2) == 2
    # interleaved, p 4, v 2: stage 0 runs 2*3 + 1*4 + 1 = 11 chunk forwards, each half of the stage
    assert micro_batches_in_flight(4, 2, 0, 16) == 11 / 2
    assert micro_batches_in_flight(4, 2, 3, 16) == 5 / 2


def test_stages_that_split_an_expert_parallel_group_are_refused():
    with pytest.raises(PipelineSplitError, match=r"divides world_size / expert_parallel_size \(32\)"):
        split_layers(_cfg(KEXAONE), 3)


@pytest.mark.slow
@pytest.mark.distributed
def test_each_stage_holds_the_memory_the_planner_gives_it(tmp_path):
    """PP 2 on 2 gloo ranks (tiny recipe, 4 layers, MTP, fp32, ZeRO-1): each stage's rank measures at its first
    step the weights, gradients and optimizer state the planner gives its stage, exactly, and activations within
    35% (both stages over: the CPU reference kernels keep more than the fused ones the planner counts; measured
    on the 2-core CPU box: stage 0, which keeps 2 micro-batches in flight, 1.22x, stage 1 1.06x; with document
    masking 1.31x and 1.07x)."""
    import json

    from launching import train_ranks

    from kmodel.plan import Cluster, make_plan
    from kmodel.train.memory import CATEGORIES, record_key

    recipe = "recipes/tiny-ko-moe.yaml"
    sets = ["model.hidden_size=64", "model.num_hidden_layers=4", "data.seq_len=64", "train.micro_batch_size=2",
            "train.grad_accum_steps=2", "train.max_steps=1", "train.warmup_steps=1", "train.eval_every=0",
            "train.eval_batches=1", "provenance.ledger=false", "parallel.backend=deepspeed", "parallel.zero_stage=1",
            "parallel.pipeline_parallel_size=2", "parallel.world_size=2"]
    train_ranks(tmp_path / "run", recipe, 2, sets)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8")]
    measured = sorted((r for r in records if r["kind"] == "memory"), key=lambda r: r["rank"])
    plan = make_plan(load_config(recipe, [*sets, "train.device=cpu"]), Cluster(1, gpus_per_node=2))
    assert len(measured) == len(plan.stages) == 2
    for record, stage in zip(measured, plan.stages):
        for category in CATEGORIES:
            planned, got = getattr(stage.memory, category), record[record_key(category)]
            tolerance = 0.35 if category == "activations" else 0
            assert got == pytest.approx(planned, rel=tolerance, abs=0), (record["rank"], category, got, planned)
