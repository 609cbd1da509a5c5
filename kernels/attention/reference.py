"""Plain-PyTorch causal / sliding-window / document-masked attention with GQA: the semantics of the op.

Shapes: q (batch, seq, q_heads, head_dim); k, v (batch, seq, kv_heads, head_dim); q_heads % kv_heads == 0.
A query at position i sees key j when j <= i (causal), i - j < window (sliding window, if given) and both
lie in the same document (if cu_seqlens is given). Without causality the window is two-sided.

Attention sinks (gpt-oss): `sinks` (q_heads,) holds one learned logit per head that joins every softmax
denominator without contributing a value, so a head can put weight "nowhere".

`decode_attention` is the same attention for a few new tokens against a KV cache (generation).

Exact and still efficient: global causal attention is one fused SDPA call; a sliding window is computed
over query blocks, each against only the keys its window can reach, so memory grows with seq * window
rather than seq ** 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Query rows per block on the sliding-window path; keys per block are this plus the window.
QUERY_BLOCK = 256


def document_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """(batch, seq) document index of every token, from cumulative lengths over the flattened batch*seq tokens."""
    total = batch * seq
    if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at batch*seq={total}; got {cu_seqlens.tolist()}")
    positions = torch.arange(total, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens.to(torch.int64), positions, right=True) - 1
    return ids.view(batch, seq)


def visibility_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, *, window: int | None, causal: bool
) -> torch.Tensor:
    """Boolean (len(q_pos), len(k_pos)) mask: True where the query may attend to the key."""
    delta = q_pos[:, None] - k_pos[None, :]
    visible = torch.ones_like(delta, dtype=torch.bool)
    if causal:
        visible &= delta >= 0
    if window is not None:
        visible &= delta < window
        if not causal:
            visible &= delta > -window
    return visible


def masked_attention(
    qt: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention in (batch, heads, seq, head_dim) layout with a boolean mask broadcastable to (batch, q_heads,
    q_len, k_len), True where visible. With sinks the softmax is written out (SDPA has no sink term); its
    logits are computed in fp32 at least."""
    gqa = qt.shape[1] != kt.shape[1]
    if sinks is None:
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    group = qt.shape[1] // kt.shape[1]
    kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    dtype = torch.promote_types(qt.dtype, torch.float32)
    logits = (qt.to(dtype) @ kt.to(dtype).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    sink = sinks.to(dtype).view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    probs = torch.cat((logits, sink), dim=-1).softmax(dim=-1)[..., :-1]
    return probs.to(vt.dtype) @ vt


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    if window is not None and window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if window is not None and window >= seq and causal:
        window = None  # the window covers everything causal attention can see
    scale = head_dim**-0.5 if scale is None else scale
    gqa = q_heads != kv_heads
    v_dim = v.shape[-1]
    if v_dim < head_dim:
        # MLA's values are narrower than its queries/keys. SDPA's fused kernels need one head dim (otherwise it
        # falls back to a path that stores the score matrix); zero columns of v leave the first v_dim outputs as
        # they are, and the result is cut back below.
        v = F.pad(v, (0, head_dim - v_dim))
    # SDPA wants (batch, heads, seq, head_dim).
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    doc = None if cu_seqlens is None else document_ids(cu_seqlens, batch, seq)

    if window is None and doc is None and sinks is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)[..., :v_dim]

    positions = torch.arange(seq, device=q.device)
    reach = seq if window is None else window - 1  # how far back (and, non-causal, ahead) a query can see
    blocks = []
    for start in range(0, seq, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, seq)
        k_start = max(0, start - reach)
        k_stop = stop if causal else min(seq, stop + reach)
        mask = visibility_mask(positions[start:stop], positions[k_start:k_stop], window=window, causal=causal)
        mask = mask.expand(batch, 1, -1, -1)
        if doc is not None:
            mask = mask & (doc[:, None, start:stop, None] == doc[:, None, None, k_start:k_stop])
        blocks.append(
            masked_attention(
                qt[:, :, start:stop], kt[:, :, k_start:k_stop], vt[:, :, k_start:k_stop], mask, scale=scale, sinks=sinks
            )
        )
    return torch.cat(blocks, dim=2).transpose(1, 2)[..., :v_dim]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_lens: torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a few new tokens against a KV cache (generation).

    q: (batch, new, q_heads, head_dim); k_cache, v_cache: (batch, capacity, kv_heads, head_dim | v_dim) holding
    every row's keys at slots 0.. in consecutive position order, the new tokens' included; cache_lens: (batch,)
    ints, the filled length of each row. Query t of row b sits at slot cache_lens[b] - new + t and sees the slots
    j at or before it with (its slot - j) < window. Equals `attention` over each row's whole sequence, restricted
    to its last `new` rows. Slots past cache_lens are never used (whatever they hold). sinks: as in `attention`.
    """
    batch, new, _, head_dim = q.shape
    capacity = k_cache.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    slots = torch.arange(capacity, device=q.device)
    lens = cache_lens.to(q.device)
    query_slots = lens[:, None] - new + torch.arange(new, device=q.device)  # (batch, new)
    distance = query_slots[:, :, None] - slots  # (batch, new, capacity)
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    filled = (slots < lens[:, None])[:, :, None, None]  # zero the unfilled slots: 0 * NaN would still be NaN
    zero = torch.zeros((), dtype=k_cache.dtype, device=k_cache.device)
    k_cache, v_cache = torch.where(filled, k_cache, zero), torch.where(filled, v_cache, zero.to(v_cache.dtype))
    out = masked_attention(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), visible[:, None], scale=scale, sinks=sinks
    )
    return out.transpose(1, 2)
