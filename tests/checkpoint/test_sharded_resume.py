"""A sharded checkpoint written by 4 ranks (expert parallelism 2, ZeRO-2) resumes on 2 ranks (EP 1) and on one
process with the losses of an uninterrupted run (CPU, gloo)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from launching import train_ranks

from kmodel.checkpoint import Manifest
from kmodel.checkpoint.index import INDEX_FILE, shard_file
from kmodel.config import load_config
from kmodel.train.run import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RECIPE = "recipes/tiny-ko-moe.yaml"
# global batch 4 rows everywhere: 4 ranks x 1, 2 ranks x 2, 1 process x 2 x 2 accumulation
TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "data.seq_len=64", "train.max_steps=4",
        "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1",
        "provenance.ledger=false"]


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def distributed(run_dir, procs: int, extra: list[str], resume: bool = False) -> None:
    train_ranks(run_dir, RECIPE, procs, TINY + ["parallel.backend=deepspeed", f"parallel.world_size={procs}", *extra],
                resume=resume)


def test_four_rank_sharded_checkpoint_resumes_on_two_ranks_and_one_process(tmp_path):
    reference = tmp_path / "reference"
    train(load_config(RECIPE, TINY + ["train.micro_batch_size=2", "train.grad_accum_steps=2"]), reference, progress=False)
    expected = losses(reference)

    run_dir = tmp_path / "run"
    # saved synchronously (straight from the partitions, no copy); the resumed runs below save in the background
    distributed(run_dir, 4, ["train.micro_batch_size=1", "parallel.zero_stage=2", "parallel.expert_parallel_size=2",
                             "train.async_checkpoint=false"])
    step2 = run_dir / "checkpoints" / "step_0000002"
    manifest = Manifest.read(step2)
    assert {shard_file("model", r, 4) for r in range(4)} <= set(manifest.files)  # every rank wrote a shard
    # each rank wrote only what it holds, nothing was gathered to one rank: a quarter of every stacked expert
    # tensor (EP 2 x expert-data-parallel 2), ZeRO-2 fragments of the dense ones, and the same of the moments
    index = json.loads((step2 / INDEX_FILE).read_text(encoding="utf-8"))["tensors"]
    experts = [entry["pieces"] for name, entry in index["model"].items() if ".experts." in name]
    assert experts and all(sorted(p["file"] for p in pieces) == [shard_file("model", r, 4) for r in range(4)] for pieces in experts)
    largest = max(index["model"].values(), key=lambda entry: math.prod(entry["shape"]))
    assert len(largest["pieces"]) > 1
    moments = index["optimizer"].values()
    assert sum(len(entry["pieces"]) for entry in moments) > len(moments)
    assert {shard_file("optimizer", r, 4) for r in range(4)} <= set(manifest.files)
    assert losses(run_dir) == pytest.approx(expected, rel=1e-5)

    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    distributed(run_dir, 2, ["train.micro_batch_size=2", "parallel.zero_stage=2", "train.checkpoint_every=1"], resume=True)
    assert losses(run_dir) == pytest.approx(expected, rel=1e-5)  # steps 3-4 from the 4-rank step 2

    for step in (3, 4):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:07d}")
    cfg = load_config(RECIPE, TINY + ["train.micro_batch_size=2", "train.grad_accum_steps=2"])
    train(cfg, run_dir, resume=True, progress=False)  # one process from the 4-rank step 2
    assert losses(run_dir) == pytest.approx(expected, rel=1e-5)


def test_a_bf16_run_resumes_with_its_fp32_masters(tmp_path):
    """bf16 weights with fp32 masters in ZeRO-2's partitions: a resume puts each rank's saved masters back
    (DeepSpeed alone would rebuild them from the bf16 weights, rounded), so steps 3-4 repeat exactly."""
    run_dir = tmp_path / "run"
    bf16 = ["train.dtype=bf16", "train.micro_batch_size=2", "parallel.zero_stage=2"]
    distributed(run_dir, 2, bf16)
    uninterrupted = losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    distributed(run_dir, 2, bf16, resume=True)
    assert losses(run_dir) == uninterrupted


def test_zero3_partitions_resume_in_one_process_and_on_zero1(tmp_path):
    """2 ranks with ZeRO-3 write their parameter partitions (flat ranges, the last one short); one process resumes
    from step 2, and 2 ranks with ZeRO-1 from the step 3 it wrote: every loss is the uninterrupted run's."""
    reference = tmp_path / "reference"
    single = TINY + ["train.micro_batch_size=2", "train.grad_accum_steps=2"]
    train(load_config(RECIPE, single), reference, progress=False)
    run_dir = tmp_path / "run"
    distributed(run_dir, 2, ["train.micro_batch_size=2", "parallel.zero_stage=3"])
    index = json.loads((run_dir / "checkpoints" / "step_0000002" / INDEX_FILE).read_text(encoding="utf-8"))["tensors"]
    largest = max(index["optimizer"].values(), key=lambda entry: math.prod(entry["shape"]))
    assert len(largest["pieces"]) == 2 and {p["file"] for p in largest["pieces"]} == {shard_file("optimizer", r, 2) for r in range(2)}
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    train(load_config(RECIPE, single + ["train.checkpoint_every=1"]), run_dir, resume=True, progress=False)
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    distributed(run_dir, 2, ["train.micro_batch_size=2", "parallel.zero_stage=1", "train.checkpoint_every=1"], resume=True)
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5)
