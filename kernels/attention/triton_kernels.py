"""Triton kernels behind `triton_impl`: flash attention forward, backward (delta, dK/dV, dQ) and decode.

Layout: q, dq (batch, seq, q_heads, head_dim), k, dk (batch, seq, kv_heads, head_dim), v, dv (batch, seq,
kv_heads, v_dim) and o, dO (batch, seq, q_heads, v_dim), any strides with a unit last stride; v_dim may differ
from head_dim (MLA), V_DIM is padded to a power of two. The q/k head dim is either padded to a power of
two (HEAD_DIM, HEAD_DIM_2 = 0) or, where it is the sum of two powers of two of at least 16, split into the
pieces [0, HEAD_DIM) and [HEAD_DIM, HEAD_DIM + HEAD_DIM_2), each loaded with its own arange and multiplied by
its own dot: MLA's 192 computes as 128 + 64 instead of padding to 256 (a quarter of the QK^T, dQ and dK work).
The log-sum-exp and delta are (batch, q_heads, seq) fp32. Query head h reads key/value head h // group, so
GQA never copies K/V.

Visibility of key j from query i: j <= i (causal), |i - j| < window (sliding window; one-sided when causal),
and, with packed documents, doc_start[i] <= j < doc_end[i], where doc_start/doc_end (batch, seq) hold the
bounds of each token's document inside its row. The relation is symmetric in documents, so the same arrays
serve the key side of the dK/dV kernel.

With sinks, each query head's sink logit seeds its online softmax (weight 1 at that logit, no value).

seq_bucket and window_bucket are read by no kernel: they are the autotune key (`triton_impl._tuning_buckets`).

Every program walks only the partner blocks its window / causal limit / document can reach, in three runs:
masked edge blocks below, unmasked interior blocks whose every pair is visible, masked edge blocks above.

Kernels are `LazyKernel`s and their device functions `jit_helper`s (`kmodel.kernels.triton_support`): jitted at
first launch in the mode TRITON_INTERPRET gives then, as every Triton op here is.
"""

from __future__ import annotations

import triton.language as tl

from kmodel.kernels.triton_support import dot, jit_helper, lazy_kernel

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# A finite start for the running row max: a tile where a row sees nothing then gives exp2(-inf - start) = 0
# rather than exp2(-inf + inf) = NaN.
ROW_MAX_START = tl.constexpr(-1.0e38)


@jit_helper
def _load_rows(base, rows, cols, row_stride, seq_len, head_dim, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (len(rows), len(cols)) tile of a (seq, head_dim) slice; rows past seq_len and padded columns read 0.
    Row offsets are 64-bit: rows * row_stride passes 2**31 at 256K tokens x 64 heads x 128."""
    ptrs = base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    if CHECK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=rows[:, None] < seq_len, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < seq_len) & (cols[None, :] < head_dim), other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < head_dim, other=0.0)
    return tile


@jit_helper
def _store_rows(base, tile, rows, cols, row_stride, seq_len, head_dim, EVEN_D: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    if EVEN_D:
        tl.store(ptrs, tile.to(base.dtype.element_ty), mask=rows[:, None] < seq_len)
    else:
        tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < seq_len) & (cols[None, :] < head_dim))


@jit_helper
def _load_qk(
    base, rows, row_stride, seq_len, head_dim, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_2: tl.constexpr,
):  # fmt: skip
    """A q or k tile as its two column pieces; without a split (HEAD_DIM_2 = 0) the second is the first again,
    which nothing then reads."""
    first = _load_rows(base, rows, tl.arange(0, HEAD_DIM), row_stride, seq_len, head_dim, CHECK_ROWS, EVEN_D)
    if HEAD_DIM_2 > 0:
        cols = HEAD_DIM + tl.arange(0, HEAD_DIM_2)
        second = _load_rows(base, rows, cols, row_stride, seq_len, head_dim, CHECK_ROWS, EVEN_D)
    else:
        second = first
    return first, second


@jit_helper
def _store_qk(
    base, tile, tile_2, rows, row_stride, seq_len, head_dim, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_2: tl.constexpr,
):  # fmt: skip
    _store_rows(base, tile, rows, tl.arange(0, HEAD_DIM), row_stride, seq_len, head_dim, EVEN_D)
    if HEAD_DIM_2 > 0:
        _store_rows(base, tile_2, rows, HEAD_DIM + tl.arange(0, HEAD_DIM_2), row_stride, seq_len, head_dim, EVEN_D)


@jit_helper
def _qk_dot(a, a_2, b, b_2, DOT_PRECISION: tl.constexpr, HEAD_DIM_2: tl.constexpr):
    """a @ b^T over the q/k head dim: one dot per piece, the second accumulating onto the first."""
    product = dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    if HEAD_DIM_2 > 0:
        product = dot(a_2, tl.trans(b_2), product, input_precision=DOT_PRECISION)
    return product


@jit_helper
def _zeros_qk(rows: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_2: tl.constexpr):
    """fp32 gradient accumulators for the two q/k pieces. Without a split the second is a separate tile that
    nothing updates or reads (the compiler drops it): an alias of the first would make the loops that carry the
    first fail to compile."""
    first = tl.zeros([rows, HEAD_DIM], dtype=tl.float32)
    second = tl.zeros([rows, HEAD_DIM_2 if HEAD_DIM_2 > 0 else HEAD_DIM], dtype=tl.float32)
    return first, second


@jit_helper
def _load_row_stat(base, rows, seq_len, CHECK_ROWS: tl.constexpr):
    """Per-row fp32 statistic (log-sum-exp or delta); rows past seq_len read 0."""
    if CHECK_ROWS:
        stat = tl.load(base + rows, mask=rows < seq_len, other=0.0)
    else:
        stat = tl.load(base + rows)
    return stat


@jit_helper
def _visible_range(
    first,
    last,
    seq_len,
    window,
    DocStart,
    DocEnd,
    SEES_BEFORE: tl.constexpr,
    SEES_AFTER: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Partners (keys of a query block, or queries of a key block) of positions first..last.

    [lo, hi) holds every partner some position sees; [full_lo, full_hi) only partners every position sees.
    SEES_BEFORE / SEES_AFTER: whether a partner may precede / follow (causal queries see before only).
    """
    if SEES_BEFORE:
        if HAS_WINDOW:
            lo = tl.maximum(first - window + 1, 0)
            full_lo = tl.maximum(last - window + 1, 0)
        else:
            lo = 0
            full_lo = 0
    else:
        lo = first
        full_lo = last
    if SEES_AFTER:
        if HAS_WINDOW:
            hi = tl.minimum(last + window, seq_len)
            full_hi = tl.minimum(first + window, seq_len)
        else:
            hi = seq_len
            full_hi = seq_len
    else:
        hi = last + 1
        full_hi = first + 1
    if HAS_DOCS:
        # Document bounds never decrease along a row, so the block's ends bound the whole block.
        lo = tl.maximum(lo, tl.load(DocStart + first))
        hi = tl.minimum(hi, tl.load(DocEnd + last))
        full_lo = tl.maximum(full_lo, tl.load(DocStart + last))
        full_hi = tl.minimum(full_hi, tl.load(DocEnd + first))
    return lo, hi, full_lo, full_hi


@jit_helper
def _split_blocks(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Block indices: [first, full_first) and [full_last, last) need masks, [full_first, full_last) do not.

    An unmasked block lies wholly inside [full_lo, full_hi), which ends at or before seq_len, so its loads
    need no bounds check either. All inputs are >= 0 (integer division truncates on the GPU).
    """
    first = lo // BLOCK
    last = tl.cdiv(hi, BLOCK)
    full_first = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK), first), last)
    full_last = tl.maximum(tl.minimum(full_hi // BLOCK, last), full_first)
    return first, full_first, full_last, last


@jit_helper
def _tile_visible(
    q_pos,
    k_pos,
    partner_pos,
    doc_lo,
    doc_hi,
    seq_len,
    window,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Mask of an edge tile. q_pos and k_pos broadcast to the tile; partner_pos is whichever of them the
    loop streams, which must lie before seq_len and, with documents, in [doc_lo, doc_hi) of the fixed side."""
    visible = partner_pos < seq_len
    if CAUSAL:
        visible = visible & (k_pos <= q_pos)
    if HAS_WINDOW:
        visible = visible & (q_pos - k_pos < window)
        if not CAUSAL:
            visible = visible & (k_pos - q_pos < window)
    if HAS_DOCS:
        visible = visible & (partner_pos >= doc_lo) & (partner_pos < doc_hi)
    return visible


@jit_helper
def _fwd_blocks(
    acc,
    row_sum,
    row_max,
    q,
    q_2,
    q_pos,
    doc_lo,
    doc_hi,
    K,
    V,
    stride_ks,
    stride_vs,
    v_cols,
    seq_len,
    head_dim,
    v_dim,
    window,
    qk_scale,
    block_first,
    block_last,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_2: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online-softmax accumulation of key blocks block_first..block_last-1 into (acc, row_sum, row_max)."""
    for block in range(block_first, block_last):
        k_pos = block * BLOCK_N + tl.arange(0, BLOCK_N)
        k, k_2 = _load_qk(K, k_pos, stride_ks, seq_len, head_dim, MASKED, EVEN_D, HEAD_DIM, HEAD_DIM_2)
        v = _load_rows(V, k_pos, v_cols, stride_vs, seq_len, v_dim, MASKED, EVEN_V)
        scores = _qk_dot(q, q_2, k, k_2, DOT_PRECISION, HEAD_DIM_2) * qk_scale
        if MASKED:
            visible = _tile_visible(
                q_pos[:, None], k_pos[None, :], k_pos[None, :], doc_lo[:, None], doc_hi[:, None],
                seq_len, window, CAUSAL, HAS_WINDOW, HAS_DOCS,
            )  # fmt: skip
            scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@lazy_kernel()
def attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    DocStart,
    DocEnd,
    Sinks,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    seq_len,
    head_dim,
    v_dim,
    q_heads,
    group,
    window,
    qk_scale,
    seq_bucket,
    window_bucket,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_2: tl.constexpr,
    V_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Latest query blocks first: under a causal mask they have the most keys, so they should not trail.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // q_heads).to(tl.int64)
    h = batch_head % q_heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // group) * stride_kh
    V += b * stride_vb + (h // group) * stride_vh
    Out += b * stride_ob + h * stride_oh
    Lse += batch_head.to(tl.int64) * seq_len

    first_q = q_block * BLOCK_M
    last_q = tl.minimum(first_q + BLOCK_M, seq_len) - 1
    q_pos = first_q + tl.arange(0, BLOCK_M)
    v_cols = tl.arange(0, V_DIM)
    if HAS_DOCS:
        DocStart += b * seq_len
        DocEnd += b * seq_len
        doc_lo = tl.load(DocStart + q_pos, mask=q_pos < seq_len, other=0)
        doc_hi = tl.load(DocEnd + q_pos, mask=q_pos < seq_len, other=0)
    else:
        doc_lo = q_pos
        doc_hi = q_pos

    q, q_2 = _load_qk(Q, q_pos, stride_qs, seq_len, head_dim, True, EVEN_D, HEAD_DIM, HEAD_DIM_2)
    acc = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)
    if HAS_SINKS:
        # The head's sink logit starts the softmax: one unit of weight at its logit, carrying no value.
        row_max = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + tl.load(Sinks + h).to(tl.float32) * LOG2E
        row_sum = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        row_max = tl.full([BLOCK_M], ROW_MAX_START, dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    lo, hi, full_lo, full_hi = _visible_range(
        first_q, last_q, seq_len, window, DocStart, DocEnd, True, not CAUSAL, HAS_WINDOW, HAS_DOCS
    )
    first, full_first, full_last, last = _split_blocks(lo, hi, full_lo, full_hi, BLOCK_N)
    acc, row_sum, row_max = _fwd_blocks(
        acc, row_sum, row_max, q, q_2, q_pos, doc_lo, doc_hi, K, V, stride_ks, stride_vs, v_cols, seq_len, head_dim,
        v_dim, window, qk_scale, first, full_first, True,
        CAUSAL, HAS_WINDOW, HAS_DOCS, EVEN_D, EVEN_V, DOT_PRECISION, HEAD_DIM, HEAD_DIM_2, BLOCK_N,
    )  # fmt: skip
    acc, row_sum, row_max = _fwd_blocks(
        acc, row_sum, row_max, q, q_2, q_pos, doc_lo, doc_hi, K, V, stride_ks, stride_vs, v_cols, seq_len, head_dim,
        v_dim, window, qk_scale, full_first, full_last, False,
        CAUSAL, HAS_WINDOW, HAS_DOCS, EVEN_D, EVEN_V, DOT_PRECISION, HEAD_DIM, HEAD_DIM_2, BLOCK_N,
    )  # fmt: skip
    acc, row_sum, row_max = _fwd_blocks(
        acc, row_sum, row_max, q, q_2, q_pos, doc_lo, doc_hi, K, V, stride_ks, stride_vs, v_cols, seq_len, head_dim,
        v_dim, window, qk_scale, full_last, last, True,
        CAUSAL, HAS_WINDOW, HAS_DOCS, EVEN_D, EVEN_V, DOT_PRECISION, HEAD_DIM, HEAD_DIM_2, BLOCK_N,
    )  # fmt: skip

    # A row that sees no key and no sink (only padding rows can) gets a zero output and lse = +inf, which
    # gives it zero weight in the backward instead of NaN. With sinks the lse includes the sink.
    seen = row_sum > 0
    safe_sum = tl.where(seen, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    lse = tl.where(seen, (row_max + tl.log2(safe_sum)) * LN2, float("inf"))
    _store_rows(Out, out, q_pos, v_cols, stride_os, seq_len, v_dim, EVEN_V)
    tl.store(Lse + q_pos, lse, mask=q_pos < seq_len)


@lazy_kernel()
def attention_bwd_delta_kernel(
    Out,
    GradOut,
    Delta,
    stride_ob,
    stride_os,
    stride_oh,
    stride_gb,
    stride_gs,
    stride_gh,
    seq_len,
    head_dim,
    q_heads,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax-gradient correction shared by the dK/dV and dQ kernels."""
    batch_head = tl.program_id(1)
    b = (batch_head // q_heads).to(tl.int64)
    h = batch_head % q_heads
    q_pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    out = _load_rows(Out + b * stride_ob + h * stride_oh, q_pos, cols, stride_os, seq_len, head_dim, True, EVEN_D)
    grad = _load_rows(GradOut + b * stride_gb + h * stride_gh, q_pos, cols, stride_gs, seq_len, head_dim, True, EVEN_D)
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
    tl.store(Delta + batch_head.to(tl.int64) * seq_len + q_pos, delta, mask=q_pos < seq_len)


@jit_helper
def _dkdv_blocks(
    dk,
    dk_2,
    dv,
    k,
    k_2,
    v,
    k_pos,
    doc_lo,
    doc_hi,
    Q,
    GradOut,
    Lse,
    Delta,
    stride_qs,
    stride_qh,
    stride_gs,
    stride_gh,
    group,
    v_cols,
    seq_len,
    head_dim,
    v_dim,
    window,
    qk_scale,
    block_first,
    block_last,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_2: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Accumulate into one key block's (dk, dv) the query blocks block_first..block_last-1 of each of the
    `group` query heads sharing its kv head (Q, GradOut, Lse, Delta point at the first of them). One flat loop
    over (head, block) rather than nested loops: a loop around the pipelined block loop costs many registers.
    Tiles are key-major (keys x queries), so p and ds come out already transposed for dv and dk."""
    blocks = block_last - block_first
    for step in range(blocks * group):
        member = step // blocks
        q_pos = (block_first + step % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        q, q_2 = _load_qk(
            Q + member * stride_qh, q_pos, stride_qs, seq_len, head_dim, MASKED, EVEN_D, HEAD_DIM, HEAD_DIM_2
        )
        grad_out = _load_rows(GradOut + member * stride_gh, q_pos, v_cols, stride_gs, seq_len, v_dim, MASKED, EVEN_V)
        lse = _load_row_stat(Lse + member * seq_len, q_pos, seq_len, MASKED) * LOG2E
        delta = _load_row_stat(Delta + member * seq_len, q_pos, seq_len, MASKED)
        scores_t = _qk_dot(k, k_2, q, q_2, DOT_PRECISION, HEAD_DIM_2) * qk_scale
        if MASKED:
            visible = _tile_visible(
                q_pos[None, :], k_pos[:, None], q_pos[None, :], doc_lo[:, None], doc_hi[:, None],
                seq_len, window, CAUSAL, HAS_WINDOW, HAS_DOCS,
            )  # fmt: skip
            scores_t = tl.where(visible, scores_t, float("-inf"))
        p_t = tl.exp2(scores_t - lse[None, :])
        dv = dot(p_t.to(grad_out.dtype), grad_out, dv, input_precision=DOT_PRECISION)
        dp_t = dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if HEAD_DIM_2 > 0:
            dk_2 = dot(ds_t.to(q.dtype), q_2, dk_2, input_precision=DOT_PRECISION)
    return dk, dk_2, dv


@lazy_kernel()
def attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    GradOut,
    Lse,
    Delta,
    GradK,
    GradV,
    DocStart,
    DocEnd,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_gb,
    stride_gs,
    stride_gh,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    seq_len,
    head_dim,
    v_dim,
    kv_heads,
    group,
    window,
    qk_scale,
    sm_scale,
    seq_bucket,
    window_bucket,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_2: tl.constexpr,
    V_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of one key/value head, summed over the `group` query heads that share it."""
    k_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // kv_heads).to(tl.int64)
    kv_head = batch_head % kv_heads
    q_heads = kv_heads * group

    first_k = k_block * BLOCK_N
    last_k = tl.minimum(first_k + BLOCK_N, seq_len) - 1
    k_pos = first_k + tl.arange(0, BLOCK_N)
    v_cols = tl.arange(0, V_DIM)
    if HAS_DOCS:
        DocStart += b * seq_len
        DocEnd += b * seq_len
        doc_lo = tl.load(DocStart + k_pos, mask=k_pos < seq_len, other=0)
        doc_hi = tl.load(DocEnd + k_pos, mask=k_pos < seq_len, other=0)
    else:
        doc_lo = k_pos
        doc_hi = k_pos
    K += b * stride_kb + kv_head * stride_kh
    k, k_2 = _load_qk(K, k_pos, stride_ks, seq_len, head_dim, True, EVEN_D, HEAD_DIM, HEAD_DIM_2)
    v = _load_rows(V + b * stride_vb + kv_head * stride_vh, k_pos, v_cols, stride_vs, seq_len, v_dim, True, EVEN_V)
    dk, dk_2 = _zeros_qk(BLOCK_N, HEAD_DIM, HEAD_DIM_2)
    dv = tl.zeros([BLOCK_N, V_DIM], dtype=tl.float32)

    lo, hi, full_lo, full_hi = _visible_range(
        first_k, last_k, seq_len, window, DocStart, DocEnd, not CAUSAL, True, HAS_WINDOW, HAS_DOCS
    )
    first, full_first, full_last, last = _split_blocks(lo, hi, full_lo, full_hi, BLOCK_M)
    # The group's query heads are consecutive: h = kv_head * group + member.
    first_head = kv_head * group
    Q += b * stride_qb + first_head * stride_qh
    GradOut += b * stride_gb + first_head * stride_gh
    Lse += (b * q_heads + first_head) * seq_len
    Delta += (b * q_heads + first_head) * seq_len
    dk, dk_2, dv = _dkdv_blocks(
        dk, dk_2, dv, k, k_2, v, k_pos, doc_lo, doc_hi, Q, GradOut, Lse, Delta, stride_qs, stride_qh, stride_gs,
        stride_gh, group, v_cols, seq_len, head_dim, v_dim, window, qk_scale, first, full_first,
        True, CAUSAL, HAS_WINDOW, HAS_DOCS, EVEN_D, EVEN_V, DOT_PRECISION, HEAD_DIM, HEAD_DIM_2, BLOCK_M,
    )  # fmt: skip
    dk, dk_2, dv = _dkdv_blocks(
        dk, dk_2, dv, k, k_2, v, k_pos, doc_lo, doc_hi, Q, GradOut, Lse, Delta, stride_qs, stride_qh, stride_gs,
        stride_gh, group, v_cols, seq_len, head_dim, v_dim, window, qk_scale, full_first, full_last,
        False, CAUSAL, HAS_WINDOW, HAS_DOCS, EVEN_D, EVEN_V, DOT_PRECISION, HEAD_DIM, HEAD_DIM_2, BLOCK_M,
    )  # fmt: skip
    dk, dk_2, dv = _dkdv_blocks(
        dk, dk_2, dv, k, k_2, v, k_pos, doc_lo, doc_hi, Q, GradOut, Lse, Delta, stride_qs, stride_qh, stride_gs,
        stride_gh, group, v_cols, seq_len, head_dim, v_dim, window, qk_scale, full_last, last,
        True, CAUSAL, HAS_WINDOW, HAS_DOCS, EVEN_D, EVEN_V, DOT_PRECISION, HEAD_DIM, HEAD_DIM_2, BLOCK_M,
    )  # fmt: skip

    GradK += b * stride_dkb + kv_head * stride_dkh
    _store_qk(GradK, dk * sm_scale, dk_2 * sm_scale, k_pos, stride_dks, seq_len, head_dim, EVEN_D, HEAD_DIM, HEAD_DIM_2)
    GradV += b * stride_dvb + kv_head * stride_dvh
    _store_rows(GradV, dv, k_pos, v_cols, stride_dvs, seq_len, v_dim, EVEN_V)


@jit_helper
def _dq_blocks(
    dq,
    dq_2,
    q,
    q_2,
    grad_out,
    lse,
    delta,
    q_pos,
    doc_lo,
    doc_hi,
    K,
    V,
    stride_ks,
    stride_vs,
    v_cols,
    seq_len,
    head_dim,
    v_dim,
    window,
    qk_scale,
    block_first,
    block_last,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_2: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Accumulate into one query block's dq the key blocks block_first..block_last-1."""
    for block in range(block_first, block_last):
        k_pos = block * BLOCK_N + tl.arange(0, BLOCK_N)
        k, k_2 = _load_qk(K, k_pos, stride_ks, seq_len, head_dim, MASKED, EVEN_D, HEAD_DIM, HEAD_DIM_2)
        v = _load_rows(V, k_pos, v_cols, stride_vs, seq_len, v_dim, MASKED, EVEN_V)
        scores = _qk_dot(q, q_2, k, k_2, DOT_PRECISION, HEAD_DIM_2) * qk_scale
        if MASKED:
            visible = _tile_visible(
                q_pos[:, None], k_pos[None, :], k_pos[None, :], doc_lo[:, None], doc_hi[:, None],
                seq_len, window, CAUSAL, HAS_WINDOW, HAS_DOCS,
            )  # fmt: skip
            scores = tl.where(visible, scores, float("-inf"))
        p = tl.exp2(scores - lse[:, None])
        dp = dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        if HEAD_DIM_2 > 0:
            dq_2 = dot(ds.to(k.dtype), k_2, dq_2, input_precision=DOT_PRECISION)
    return dq, dq_2


@lazy_kernel()
def attention_bwd_dq_kernel(
    Q,
    K,
    V,
    GradOut,
    Lse,
    Delta,
    GradQ,
    DocStart,
    DocEnd,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_gb,
    stride_gs,
    stride_gh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    seq_len,
    head_dim,
    v_dim,
    q_heads,
    group,
    window,
    qk_scale,
    sm_scale,
    seq_bucket,
    window_bucket,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_2: tl.constexpr,
    V_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // q_heads).to(tl.int64)
    h = batch_head % q_heads
    K += b * stride_kb + (h // group) * stride_kh
    V += b * stride_vb + (h // group) * stride_vh

    first_q = q_block * BLOCK_M
    last_q = tl.minimum(first_q + BLOCK_M, seq_len) - 1
    q_pos = first_q + tl.arange(0, BLOCK_M)
    v_cols = tl.arange(0, V_DIM)
    if HAS_DOCS:
        DocStart += b * seq_len
        DocEnd += b * seq_len
        doc_lo = tl.load(DocStart + q_pos, mask=q_pos < seq_len, other=0)
        doc_hi = tl.load(DocEnd + q_pos, mask=q_pos < seq_len, other=0)
    else:
        doc_lo = q_pos
        doc_hi = q_pos
    Q += b * stride_qb + h * stride_qh
    q, q_2 = _load_qk(Q, q_pos, stride_qs, seq_len, head_dim, True, EVEN_D, HEAD_DIM, HEAD_DIM_2)
    GradOut += b * stride_gb + h * stride_gh
    grad_out = _load_rows(GradOut, q_pos, v_cols, stride_gs, seq_len, v_dim, True, EVEN_V)
    stats_offset = batch_head.to(tl.int64) * seq_len
    lse = _load_row_stat(Lse + stats_offset, q_pos, seq_len, True) * LOG2E
    delta = _load_row_stat(Delta + stats_offset, q_pos, seq_len, True)
    dq, dq_2 = _zeros_qk(BLOCK_M, HEAD_DIM, HEAD_DIM_2)

    lo, hi, full_lo, full_hi = _visible_range(
        first_q, last_q, seq_len, window, DocStart, DocEnd, True, not CAUSAL, HAS_WINDOW, HAS_DOCS
    )
    first, full_first, full_last, last = _split_blocks(lo, hi, full_lo, full_hi, BLOCK_N)
    dq, dq_2 = _dq_blocks(
        dq, dq_2, q, q_2, grad_out, lse, delta, q_pos, doc_lo, doc_hi, K, V, stride_ks, stride_vs, v_cols, seq_len,
        head_dim, v_dim, window, qk_scale, first, full_first, True,
        CAUSAL, HAS_WINDOW, HAS_DOCS, EVEN_D, EVEN_V, DOT_PRECISION, HEAD_DIM, HEAD_DIM_2, BLOCK_N,
    )  # fmt: skip
    dq, dq_2 = _dq_blocks(
        dq, dq_2, q, q_2, grad_out, lse, delta, q_pos, doc_lo, doc_hi, K, V, stride_ks, stride_vs, v_cols, seq_len,
        head_dim, v_dim, window, qk_scale, full_first, full_last, False,
        CAUSAL, HAS_WINDOW, HAS_DOCS, EVEN_D, EVEN_V, DOT_PRECISION, HEAD_DIM, HEAD_DIM_2, BLOCK_N,
    )  # fmt: skip
    dq, dq_2 = _dq_blocks(
        dq, dq_2, q, q_2, grad_out, lse, delta, q_pos, doc_lo, doc_hi, K, V, stride_ks, stride_vs, v_cols, seq_len,
        head_dim, v_dim, window, qk_scale, full_last, last, True,
        CAUSAL, HAS_WINDOW, HAS_DOCS, EVEN_D, EVEN_V, DOT_PRECISION, HEAD_DIM, HEAD_DIM_2, BLOCK_N,
    )  # fmt: skip
    GradQ += b * stride_dqb + h * stride_dqh
    _store_qk(GradQ, dq * sm_scale, dq_2 * sm_scale, q_pos, stride_dqs, seq_len, head_dim, EVEN_D, HEAD_DIM, HEAD_DIM_2)


@lazy_kernel()
def attention_decode_kernel(
    Q,
    KCache,
    VCache,
    CacheLens,
    PartialOut,
    PartialLse,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    new_tokens,
    head_dim,
    v_dim,
    kv_heads,
    group,
    window,
    qk_scale,
    split_len,
    HAS_WINDOW: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_2: tl.constexpr,
    V_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (batch row, kv head, key split) of decoding: the rows are the group's query heads x new tokens, so
    each cached key/value block is read once per kv head. Writes the split's normalised output and
    log-sum-exp (-inf where nothing is visible) for `triton_impl.decode_attention` to merge."""
    batch_head = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = (batch_head // kv_heads).to(tl.int64)
    kv_head = batch_head % kv_heads
    q_heads = kv_heads * group
    cache_len = tl.load(CacheLens + b).to(tl.int32)

    rows = tl.arange(0, BLOCK_M)
    member = rows // new_tokens
    token = rows % new_tokens
    head = kv_head * group + member
    real_row = rows < group * new_tokens
    q_pos = cache_len - new_tokens + token  # the new tokens are the last ones in the cache
    v_cols = tl.arange(0, V_DIM)
    q_rows = Q + b * stride_qb + token[:, None] * stride_qs + head[:, None] * stride_qh
    cols = tl.arange(0, HEAD_DIM)
    q = tl.load(q_rows + cols[None, :], mask=real_row[:, None] & (cols < head_dim)[None, :], other=0.0)
    if HEAD_DIM_2 > 0:
        cols_2 = HEAD_DIM + tl.arange(0, HEAD_DIM_2)
        q_2 = tl.load(q_rows + cols_2[None, :], mask=real_row[:, None] & (cols_2 < head_dim)[None, :], other=0.0)
    else:
        q_2 = q
    KCache += b * stride_kb + kv_head * stride_kh
    VCache += b * stride_vb + kv_head * stride_vh

    # Keys any of these queries can see start at the oldest query's window; this split takes its share.
    if HAS_WINDOW:
        first_key = tl.maximum(cache_len - new_tokens - window + 1, 0)
    else:
        first_key = 0
    start = first_key + split * split_len
    stop = tl.minimum(start + split_len, cache_len)

    acc = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], ROW_MAX_START, dtype=tl.float32)
    for block_start in range(start, stop, BLOCK_N):
        k_pos = block_start + tl.arange(0, BLOCK_N)
        in_cache = k_pos < stop
        k, k_2 = _load_qk(KCache, k_pos, stride_ks, stop, head_dim, True, EVEN_D, HEAD_DIM, HEAD_DIM_2)
        v = _load_rows(VCache, k_pos, v_cols, stride_vs, stop, v_dim, True, EVEN_V)
        scores = _qk_dot(q, q_2, k, k_2, DOT_PRECISION, HEAD_DIM_2) * qk_scale
        visible = in_cache[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=DOT_PRECISION)
        row_max = new_max

    seen = row_sum > 0
    safe_sum = tl.where(seen, row_sum, 1.0)
    lse = tl.where(seen, (row_max + tl.log2(safe_sum)) * LN2, float("-inf"))
    # Partial results are (batch, q_heads, new_tokens, splits[, V_DIM]) fp32.
    slot = ((b * q_heads + head) * new_tokens + token) * splits + split
    tl.store(PartialLse + slot, lse, mask=real_row)
    out_ptrs = PartialOut + slot[:, None] * V_DIM + v_cols[None, :]
    tl.store(out_ptrs, acc / safe_sum[:, None], mask=real_row[:, None])
