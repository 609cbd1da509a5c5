"""Context parallelism in training (kmodel.parallel.entry under torchrun, gloo, CPU): CP 2 and CP 4 give the losses of
one process on the tiny recipe, and so does CP 2 x DP 2 with expert parallelism and ZeRO-2; the bytes each rank's
attention layers receive, by layer kind, are the formula's; what CP cannot split is refused naming the numbers.

The model: per-layer windows 16, 24, 16 and a global NoPE layer, attention sinks, document masking, 128 tokens
(5 to 8 windows). CP 2 cuts a row into 4 chunks of 32 (every halo comes from the neighbouring chunk); CP 4 into 8
chunks of 16, so layer 1's window of 24 reaches past the previous chunk and that layer gathers instead. The MLA
variant exchanges each token's latent and shared RoPE key (16 + 8 numbers) instead of 4 heads' keys and values.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist
from launching import spawn_ranks
from launching import train_ranks

from kmodel.config import ConfigError, load_config
from kmodel.data import Batch
from kmodel.model import build_model
from kmodel.model.decoder import Rows
from kmodel.parallel import expert_parallel as xp
from kmodel.parallel.context_parallel import (
    ContextLayout,
    ContextParallel,
    SplitEvaluation,
    check_supported,
    gather_bytes,
    gathered_windows,
    halo_bytes,
)
from kmodel.parallel.deepspeed_config import deepspeed_config
from kmodel.train.run import train
from kmodel.train.trainer import Trainer

RECIPE = "recipes/tiny-ko-moe.yaml"
TINY = ["model.hidden_size=64", "model.sliding_window_pattern=null", "model.sliding_window=24",
        "model.sliding_windows=[16,24,16,null]", "model.attention_sinks=true", "model.num_nextn_predict_layers=0",
        "data.seq_len=128", "data.document_masking=true", "train.micro_batch_size=2", "train.max_steps=4",
        "train.warmup_steps=1", "train.checkpoint_every=4", "train.eval_every=0", "train.eval_batches=1"]
MLA = ["model.attention_kind=mla", "model.num_key_value_heads=4", "model.kv_lora_rank=16", "model.qk_nope_head_dim=24",
       "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.qk_norm=false", "model.attention_sinks=false"]


def _records(run_dir, kind: str) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as lines:
        return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir, "train")}


def _single(run_dir, extra: list[str] = ()) -> dict[int, float]:
    train(load_config(RECIPE, TINY + list(extra)), run_dir, progress=False)
    return _losses(run_dir)


def _context_parallel(run_dir, procs: int, cp: int, extra: list[str] = (), resume: bool = False):
    sets = TINY + ["parallel.backend=deepspeed", f"parallel.world_size={procs}",
                   f"parallel.context_parallel_size={cp}", *extra]
    return train_ranks(run_dir, RECIPE, procs, sets, resume=resume, timeout=500)


def _assert_same_losses(got: dict[int, float], reference: dict[int, float]) -> None:
    assert got.keys() == reference.keys() == {1, 2, 3, 4}
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


# Gradients, float64, without DeepSpeed: every loss term switched on (balance loss per sequence or per micro-batch,
# router and logits z-losses), labels with ignored positions, documents crossing chunk boundaries. With MTP (MoE
# blocks): depth 1 on the global last layer; depth 2 on a sliding one (window 16: halos). The last k positions,
# which one process drops at depth k, sit on CP rank 0: left out of its loss and MoE statistics.
LOSSES = ["model.aux_loss_coef=0.01", "model.router_z_loss_coef=0.001", "model.logits_z_loss_coef=0.0001"]
MTP1 = ["model.num_nextn_predict_layers=1"]
MTP2 = ["model.num_nextn_predict_layers=2", "model.sliding_windows=[16,24,null,16]"]
GRADIENT_CASES = [([], "sequence"), ([], "batch"), (MLA, "sequence"), (MTP1, "sequence"), (MTP2, "batch")]


def _batch(seq: int) -> Batch:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 8192, (2, seq + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.1] = -100
    starts = [[0, 13, 40, 77, 100], [0, 29, 35, 90]]  # across the chunks of CP 2 (32) and CP 4 (16)
    segments = torch.stack([torch.bucketize(torch.arange(seq), torch.tensor(b[1:]), right=True) for b in starts])
    return Batch(ids[:, :-1], labels, segments)


def _gradient_worker(rank: int, size: int) -> None:
    for model_sets, kind in GRADIENT_CASES:
        cfg = load_config(RECIPE, TINY + LOSSES + model_sets + [f"model.aux_loss_kind={kind}"])
        batch = _batch(cfg.data.seq_len)
        one = build_model(cfg).double()
        out = one(batch.input_ids, batch.labels, segment_ids=batch.segment_ids)
        out.loss.backward()

        split = build_model(cfg).double()
        context = ContextParallel(cfg.data.seq_len, dist.group.WORLD)
        context.attach(split)
        xp.attach_global_balance(split, dist.group.WORLD)  # as the engine does: counts over the CP group
        terms = context.run(batch, split, lambda loss: loss.backward())

        assert (out.mtp_loss is not None) == (cfg.model.num_nextn_predict_layers > 0)  # MTP terms compared
        where = f"CP {size} rank {rank} {cfg.model.attention_kind} {kind} MTP {cfg.model.num_nextn_predict_layers}"
        for key, value in terms.items():  # the mean over the ranks is the one-process term
            mean = value.detach().clone()
            dist.all_reduce(mean)
            torch.testing.assert_close(mean / size, getattr(out, key).detach(), rtol=1e-10, atol=1e-13,
                                       msg=lambda m, k=key, w=where: f"{w} {k}: {m}")
        reference = dict(one.named_parameters())
        for name, param in split.named_parameters():  # and so is the mean of the gradients
            grad = param.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad / size, reference[name].grad, rtol=1e-9, atol=1e-13,
                                       msg=lambda m, n=name, w=where: f"{w} d{n}: {m}")
        for name, moe in split.moe_layers().items():  # expert loads for the bias step: summed over ranks
            load = moe.load.clone()
            dist.all_reduce(load)
            assert torch.equal(load, one.moe_layers()[name].load), f"{where} {name} load"
        with torch.no_grad():  # held-out evaluation on the chunks: the whole rows' cross-entropy on every rank
            evaluated = SplitEvaluation(split, context).eval()(batch.input_ids, batch.labels).lm_loss
            expected = one.eval()(batch.input_ids, batch.labels).lm_loss
        torch.testing.assert_close(evaluated, expected, rtol=1e-10, atol=0, msg=lambda m, w=where: f"{w} eval: {m}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 4])
def test_context_parallel_gradients_equal_one_process(size):
    spawn_ranks(_gradient_worker, size)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One-process losses per model variant, trained on first use."""
    done = {}

    def run(variant: str):
        if variant not in done:
            done[variant] = tmp_path_factory.mktemp(f"single-{variant}")
            _single(done[variant], MLA if variant == "mla" else [])
        return done[variant]

    return run


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("cp, variant, layout", [
    (2, "gqa", ["parallel.zero_stage=1"]), (4, "gqa", ["parallel.zero_stage=1"]), (2, "mla", ["parallel.zero_stage=1"]),
    (2, "gqa", ["parallel.zero_stage=3", "train.activation_checkpointing=true"]),  # attention recomputed in backward
], ids=["cp2", "cp4", "cp2-mla", "cp2-zero3-recompute"])
def test_context_parallel_matches_one_process(tmp_path, references, cp, variant, layout):
    model = MLA if variant == "mla" else []
    done = _context_parallel(tmp_path, cp, cp, [*layout, *model])
    reference = references(variant)
    _assert_same_losses(_losses(tmp_path), _losses(reference))
    # the final held-out evaluation, each rank on its chunks of the rows (weights as close as the losses)
    assert _records(tmp_path, "eval")[-1]["loss"] == pytest.approx(_records(reference, "eval")[-1]["loss"], rel=1e-5)
    assert _records(tmp_path, "train")[-1]["tokens"] == 4 * 2 * 128  # a step trains the DP ranks' rows once

    # Bytes received in one forward, by layer kind: halo rows from the neighbours' chunks for sliding layers (or a
    # gather where the window reaches past a chunk), every other rank's rows for the global layer.
    cfg = load_config(RECIPE, TINY + model + ["parallel.backend=deepspeed", f"parallel.world_size={cp}",
                                              f"parallel.context_parallel_size={cp}"])
    m = cfg.model
    if variant == "mla":  # the normalised latent and the shared rotated key, fp32
        row_bytes = cfg.train.micro_batch_size * (m.kv_lora_rank + m.qk_rope_head_dim) * 4
    else:  # every key/value head's key and value, fp32
        row_bytes = cfg.train.micro_batch_size * m.num_key_value_heads * 2 * m.head_dim * 4
    records = _records(tmp_path, "context_parallel")
    assert sorted(r["cp_rank"] for r in records) == list(range(cp))
    for record in records:
        layout = ContextLayout(cfg.data.seq_len, cp, record["cp_rank"])
        windows = [m.window_of(i) for i in range(m.num_hidden_layers)]
        expected = {"sliding": sum(halo_bytes(layout, w, row_bytes) for w in windows if w is not None),
                    "global": sum(gather_bytes(layout, row_bytes) for w in windows if w is None)}
        assert record["received_bytes"] == expected, record
        if cp == 2:  # every sliding layer exchanges a halo: a fraction of what gathering would move
            assert expected["sliding"] < 3 * gather_bytes(layout, row_bytes) / 2
    if cp == 4:
        assert gathered_windows(cfg) == [(1, 24)]
        assert "layer 1's sliding window 24 reaches past the previous context-parallel chunk of 16 tokens" in done.stderr


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.zero_stage=1"],
                                    ["parallel.zero_stage=3", "train.activation_checkpointing=true"]],
                         ids=["zero1", "zero3-recompute"])
def test_context_parallel_with_mtp_matches_one_process(tmp_path, layout):
    """MTP depth 2 (MoE blocks, balancing bias updated from their counted tokens): CP 2 trains the losses of one
    process, the MTP and aux terms included, and evaluates the same held-out loss; under ZeRO-3 the embedding,
    called again for the tokens MTP reads ahead, is gathered for both calls."""
    mtp = ["model.num_nextn_predict_layers=2", "model.mtp_mlp_type=sparse"]
    reference = tmp_path / "single"
    _single(reference, mtp)
    _context_parallel(tmp_path / "cp2", 2, 2, [*layout, *mtp])
    _assert_same_losses(_losses(tmp_path / "cp2"), _losses(reference))
    got, expected = _records(tmp_path / "cp2", "train"), _records(reference, "train")
    for key in ("mtp_loss", "aux_loss"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in expected], rel=1e-5), key
    assert _records(tmp_path / "cp2", "eval")[-1]["loss"] == pytest.approx(_records(reference, "eval")[-1]["loss"],
                                                                         rel=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_context_parallel_in_bf16_tracks_one_rank(tmp_path):
    """bf16 weights (DeepSpeed's bf16 ZeRO-1; exchanged keys and values in bf16): CP 2 follows one DeepSpeed rank
    to bf16 accuracy (measured: 4e-4 relative by step 4)."""
    bf16 = ["train.dtype=bf16", "parallel.zero_stage=1", "provenance.ledger=false"]
    _context_parallel(tmp_path / "one", 1, 1, bf16)
    _context_parallel(tmp_path / "cp2", 2, 2, bf16)
    one, cp2 = _losses(tmp_path / "one"), _losses(tmp_path / "cp2")
    assert one.keys() == cp2.keys() == {1, 2, 3, 4}
    assert cp2 == pytest.approx(one, rel=1e-3)


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_between_one_process_and_context_parallel(tmp_path):
    """One process writes step 2 and CP 2 (ZeRO-2: dense state partitioned over the replica group) continues from
    it; CP 2 writes step 3 and one process continues: every loss is the uninterrupted run's."""
    no_ledger = ["provenance.ledger=false"]  # the ledger rightly refuses the history rewinds this test makes
    reference = _single(tmp_path, [*no_ledger, "train.checkpoint_every=2"])
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")
    _context_parallel(tmp_path, 2, 2, [*no_ledger, "parallel.zero_stage=2", "train.checkpoint_every=1"], resume=True)
    _assert_same_losses(_losses(tmp_path), reference)  # steps 3 and 4 logged again, by CP 2
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")
    train(load_config(RECIPE, TINY + no_ledger), tmp_path, resume=True, progress=False)
    _assert_same_losses(_losses(tmp_path), reference)


@pytest.mark.distributed
@pytest.mark.slow
def test_context_data_and_expert_parallel_compose(tmp_path):
    """World 4 = CP 2 x DP 2, EP 2 (each EP group spans the two CP ranks of one sequence), ZeRO-2: the losses of
    one process reading the same two micro-batches per step. Without document masking: plain causal attention."""
    plain = ["data.document_masking=false"]
    reference = _single(tmp_path / "single", [*plain, "train.grad_accum_steps=2"])
    _context_parallel(tmp_path / "cp2dp2", 4, 2, [*plain, "parallel.zero_stage=2", "parallel.expert_parallel_size=2"])
    _assert_same_losses(_losses(tmp_path / "cp2dp2"), reference)
    assert _records(tmp_path / "cp2dp2", "train")[-1]["tokens"] == 4 * 2 * 2 * 128


@pytest.mark.slow
def test_documents_cross_chunk_boundaries(tmp_path):
    """The equality tests above mean something: in the first rows they train on, documents run across the chunk
    boundaries of both layouts."""
    trainer = Trainer(load_config(RECIPE, TINY), tmp_path, progress=False)
    segments = trainer.data.next_batch(2).segment_ids
    for cp in (2, 4):
        length = 128 // (2 * cp)
        crossing = [b for b in range(length, 128, length) if bool((segments[:, b - 1] == segments[:, b]).any())]
        assert len(crossing) >= cp, (cp, crossing)


def test_mtp_on_whole_rows_handed_as_rows_equals_the_truncated_path():
    """One process, float64: the path a CP rank takes (`rows` given; every position kept, the last k of depth k
    masked out of the loss and the MoE statistics) on a part that is the whole row gives the loss terms,
    gradients and expert loads of the path that drops those positions. Fast: the default suite's check."""
    cfg = load_config(RECIPE, TINY + LOSSES + MTP2 + ["model.mtp_mlp_type=sparse", "data.seq_len=32"])
    batch = _batch(cfg.data.seq_len)
    runs = []
    for rows in (None, Rows(batch.input_ids, batch.labels)):
        model = build_model(cfg).double()
        out = model(batch.input_ids, batch.labels, rows=rows)
        out.loss.backward()
        runs.append((out, dict(model.named_parameters()), model.moe_layers()))
    (plain, weights, moes), (masked, masked_weights, masked_moes) = runs
    for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(masked, key), getattr(plain, key), rtol=1e-12, atol=0, msg=key)
    for name, param in masked_weights.items():
        torch.testing.assert_close(param.grad, weights[name].grad, rtol=1e-10, atol=1e-15, msg=name)
    for name, moe in masked_moes.items():
        assert torch.equal(moe.load, moes[name].load), name


def test_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"splits each sequence into 8 zigzag chunks, which must divide data.seq_len \(100\)"):
        load_config(RECIPE, TINY + ["data.seq_len=100", "parallel.backend=deepspeed", "parallel.world_size=4",
                                    "parallel.context_parallel_size=4"])
    layout = ["parallel.backend=deepspeed", "parallel.world_size=2", "parallel.context_parallel_size=2"]
    check_supported(load_config(RECIPE, TINY + layout + ["model.num_nextn_predict_layers=2", "parallel.zero_stage=1"]))
    with pytest.raises(ConfigError, match="parallel.zero_stage 1, 2 or 3"):
        check_supported(load_config(RECIPE, TINY + layout))
    check_supported(load_config(RECIPE, TINY + layout + ["parallel.zero_stage=1"]))


def test_deepspeed_counts_the_rows_of_data_parallel_ranks_only():
    """CP ranks share rows: DeepSpeed's global batch is micro x accumulation x DP, not x world."""
    cfg = load_config(RECIPE, TINY + ["parallel.backend=deepspeed", "parallel.world_size=8", "parallel.zero_stage=1",
                                      "parallel.context_parallel_size=4", "train.grad_accum_steps=3",
                                      "parallel.global_batch_size=12"])
    assert deepspeed_config(cfg, "cpu")["train_batch_size"] == 12 == 2 * 3 * cfg.parallel.data_parallel_size
