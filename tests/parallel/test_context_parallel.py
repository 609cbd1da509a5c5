"""Context-parallel attention (kmodel.parallel.context_parallel) equals one-process attention, on gloo ranks.

Each rank holds its zigzag chunks of q, k, v; outputs and gradients (q, k, v, sinks) must equal the rows of the
whole-sequence reference, with packed documents crossing chunk boundaries, GQA, MLA-like narrower values, sliding
windows shorter and longer than a chunk, and global layers. The bytes each rank receives must equal the formula.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from launching import spawn_ranks

from kmodel.kernels.attention.reference import attention
from kmodel.parallel.context_parallel import (
    CommStats, ContextLayout, context_parallel_attention, gather_bytes, halo_bytes,
)

SEQ, BATCH, Q_HEADS, KV_HEADS, HEAD_DIM, V_DIM = 48, 2, 4, 2, 8, 6
CASES = [  # (window, sinks): windows shorter than every chunk, longer than a CP-4 chunk (gathered), global
    (5, False), (5, True), (9, False), (None, False), (None, True),
]


def _whole_sequence_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, generator=g)
    k = torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(BATCH, SEQ, KV_HEADS, V_DIM, generator=g)
    sinks = torch.randn(Q_HEADS, generator=g)
    upstream = torch.randn(BATCH, SEQ, Q_HEADS, V_DIM, generator=g)
    # Packed documents: boundaries fall inside chunks and across them, different per row.
    cu = torch.tensor([0, 7, 20, 31, SEQ, SEQ + 13, SEQ + 30, 2 * SEQ])
    doc_ids = (torch.searchsorted(cu, torch.arange(BATCH * SEQ), right=True) - 1).view(BATCH, SEQ)
    return q, k, v, sinks, upstream, cu, doc_ids


def _worker(rank: int, size: int) -> None:
    for case, (window, use_sinks) in enumerate(CASES):
        q, k, v, sinks, upstream, cu, doc_ids = _whole_sequence_inputs(case)
        sinks = sinks if use_sinks else None
        # One process, whole sequence.
        leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([sinks.clone().requires_grad_()] if use_sinks else [])
        ref = attention(*leaves[:3], window=window, cu_seqlens=cu, sinks=leaves[3] if use_sinks else None)
        (ref * upstream).sum().backward()

        layout = ContextLayout(SEQ, size, rank)
        local = [layout.shard(t).clone().requires_grad_() for t in (q, k, v)]
        local_sinks = sinks.clone().requires_grad_() if use_sinks else None
        stats = CommStats()
        out = context_parallel_attention(*local, layout=layout, group=dist.group.WORLD, window=window,
                                         doc_ids=doc_ids, sinks=local_sinks, stats=stats)
        (out * layout.shard(upstream)).sum().backward()

        where = f"CP {size} rank {rank} window {window} sinks {use_sinks}"
        torch.testing.assert_close(out, layout.shard(ref), rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} out: {m}")
        for name, mine, theirs in zip("qkv", local, leaves):
            torch.testing.assert_close(mine.grad, layout.shard(theirs.grad), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{where} d{n}: {m}")
        if use_sinks:
            grad = local_sinks.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, leaves[3].grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} dsinks: {m}")
        row_bytes = BATCH * KV_HEADS * (HEAD_DIM + V_DIM) * q.element_size()
        kind = "global" if window is None else "sliding"
        expected = gather_bytes(layout, row_bytes) if window is None else halo_bytes(layout, window, row_bytes)
        assert stats.received[kind] == expected, f"{where}: received {stats.received[kind]} bytes, formula {expected}"
        if window == 5 and size > 1:  # the halo moves a fraction of a gather's bytes
            assert expected < gather_bytes(layout, row_bytes) / 2


@pytest.mark.distributed
@pytest.mark.parametrize("size", [2, 4])
def test_context_parallel_attention_equals_one_process(size):
    spawn_ranks(_worker, size)


def test_layout_is_load_balanced_and_round_trips():
    layout = ContextLayout(48, 4, 1)
    assert layout.chunks() == (1, 6) and layout.positions().tolist() == list(range(6, 12)) + list(range(36, 42))
    # Causal work (sum of positions + 1 over local queries) is the same on every rank.
    work = {(ContextLayout(48, 4, r).positions() + 1).sum().item() for r in range(4)}
    assert len(work) == 1
    x = torch.arange(2 * 48).view(2, 48)
    pieces = [ContextLayout(48, 4, r).shard(x) for r in range(4)]
    assert torch.equal(layout.unshard(pieces), x)


def test_layout_refuses_a_length_the_zigzag_cannot_split():
    with pytest.raises(ValueError, match="sequence length 50 is not divisible by 2 x context_parallel_size = 8"):
        ContextLayout(50, 4, 0)
