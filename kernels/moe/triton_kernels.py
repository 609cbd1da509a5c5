"""The Triton kernels behind `triton_impl` (the router, dispatch, grouped SwiGLU GEMMs, gather combine): bodies
only, wrapped by `LazyKernel` at first launch. What each computes, and why, is told in `triton_impl`'s docstring
and at each kernel; the launchers, autograd Functions and public functions live there.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kmodel.kernels.triton_support import dot, lazy_kernel

# Epilogues of the grouped GEMM.
_PLAIN = 0  # out = acc (+ bias)
_SWIGLU_FORWARD = 1  # acc = gate, second accumulator = up (+ biases): store gate_up and h = act(gate, up)
_SWIGLU_BACKWARD = 2  # acc = d h: store d gate_up from the saved gate_up

# Where the weight-gradient kernel takes its input rows from.
_INPUT_ROWS = 0  # input[row]
_INPUT_TOKENS = 1  # input[token of row] (the gather from x)
_INPUT_SWIGLU = 2  # h = act(gate, up) recomputed from gate_up[row]


@lazy_kernel()
def _route_kernel(
    logits_ptr, bias_ptr, scores_ptr, weights_ptr, experts_ptr, block_counts_ptr,
    num_tokens, num_experts, routed_scaling_factor, stride_logits,
    TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    block = tl.program_id(0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < num_tokens
    tokens64 = tokens.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    tile_ok = token_ok[:, None] & col_ok[None, :]

    logits = tl.load(logits_ptr + tokens64[:, None] * stride_logits + cols[None, :], mask=tile_ok, other=0.0)
    logits = logits.to(tl.float32)
    if SOFTMAX:
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = shifted / tl.sum(shifted, axis=1)[:, None]
    else:
        scores = tl.sigmoid(logits)
    tl.store(scores_ptr + tokens64[:, None] * num_experts + cols[None, :], scores, mask=tile_ok)

    # The correction bias steers the choice only; the weights below come from the unbiased scores.
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    selectable = tl.broadcast_to(col_ok[None, :], (BLOCK_T, BLOCK_E))

    if N_GROUP > 1:
        # Group score = sum of the group's best two biased scores; keep the TOPK_GROUP best groups.
        group_of_col = cols // GROUP_SIZE
        groups = tl.arange(0, BLOCK_G)
        group_score = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
        for group in range(N_GROUP):
            in_group = selectable & (group_of_col == group)[None, :]
            member = tl.where(in_group, choice, float("-inf"))
            best = tl.max(member, axis=1)
            if GROUP_SIZE > 1:
                first = tl.min(tl.where(in_group & (member == best[:, None]), cols[None, :], BLOCK_E), axis=1)
                best += tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), member), axis=1)
            group_score = tl.where(groups[None, :] == group, best[:, None], group_score)
        group_open = tl.broadcast_to((groups < N_GROUP)[None, :], (BLOCK_T, BLOCK_G))
        kept = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for _ in range(TOPK_GROUP):
            open_score = tl.where(group_open, group_score, float("-inf"))
            top = tl.max(open_score, axis=1)
            pick = tl.min(tl.where(group_open & (open_score == top[:, None]), groups[None, :], BLOCK_G), axis=1)
            group_open = group_open & (groups[None, :] != pick[:, None])
            kept = tl.where(group_of_col[None, :] == pick[:, None], 1, kept)
        selectable = selectable & (kept == 1)

    # Top-k by repeated arg-max; among equal choices the lowest expert index wins.
    slots = tl.arange(0, BLOCK_K)
    taken = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
    picked = tl.zeros((BLOCK_T, BLOCK_K), tl.int64)
    picked_score = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    for slot in range(TOP_K):
        is_open = selectable & (taken == 0)
        open_choice = tl.where(is_open, choice, float("-inf"))
        top = tl.max(open_choice, axis=1)
        pick = tl.min(tl.where(is_open & (open_choice == top[:, None]), cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == pick[:, None]
        taken = tl.where(hit, 1, taken)
        in_slot = slots[None, :] == slot
        picked = tl.where(in_slot, pick.to(tl.int64)[:, None], picked)
        picked_score = tl.where(in_slot, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None], picked_score)
    if NORMALIZE:
        picked_score = picked_score / (tl.sum(picked_score, axis=1)[:, None] + 1e-20)
    slot_ok = token_ok[:, None] & (slots < TOP_K)[None, :]
    slot_offsets = tokens64[:, None] * TOP_K + slots[None, :]
    tl.store(weights_ptr + slot_offsets, picked_score * routed_scaling_factor, mask=slot_ok)
    tl.store(experts_ptr + slot_offsets, picked, mask=slot_ok)
    block_counts = tl.sum(tl.where(token_ok[:, None], taken, 0), axis=0)
    tl.store(block_counts_ptr + block * num_experts + cols, block_counts, mask=col_ok)


@lazy_kernel()
def _route_backward_kernel(
    scores_ptr, experts_ptr, grad_weights_ptr, grad_scores_ptr, grad_logits_ptr,
    num_tokens, num_experts, routed_scaling_factor,
    TOP_K: tl.constexpr, SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < num_tokens
    tokens64 = tokens.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    tile_ok = token_ok[:, None] & (cols < num_experts)[None, :]
    tile_offsets = tokens64[:, None] * num_experts + cols[None, :]
    scores = tl.load(scores_ptr + tile_offsets, mask=tile_ok, other=0.0)
    if HAS_GRAD_SCORES:
        grad_scores = tl.load(grad_scores_ptr + tile_offsets, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        grad_scores = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    if HAS_GRAD_WEIGHTS:
        slots = tl.arange(0, BLOCK_K)
        slot_ok = token_ok[:, None] & (slots < TOP_K)[None, :]
        slot_offsets = tokens64[:, None] * TOP_K + slots[None, :]
        picked = tl.load(experts_ptr + slot_offsets, mask=slot_ok, other=0)
        grad_weights = tl.load(grad_weights_ptr + slot_offsets, mask=slot_ok, other=0.0).to(tl.float32)
        picked_score = tl.load(scores_ptr + tokens64[:, None] * num_experts + picked, mask=slot_ok, other=0.0)
        if NORMALIZE:
            # w_j = c s_j / S with S = sum_i s_i + 1e-20:  d/ds_j = (c g_j - sum_i g_i w_i) / S
            total = tl.sum(picked_score, axis=1) + 1e-20
            weights = routed_scaling_factor * picked_score / total[:, None]
            grad_picked = (routed_scaling_factor * grad_weights - tl.sum(grad_weights * weights, axis=1)[:, None])
            grad_picked = grad_picked / total[:, None]
        else:
            grad_picked = routed_scaling_factor * grad_weights
        # A token's k experts are distinct, so adding slot by slot never merges two slots into one column.
        for slot in range(TOP_K):
            in_slot = slots[None, :] == slot
            expert = tl.sum(tl.where(in_slot, picked, 0), axis=1)
            grad = tl.sum(tl.where(in_slot, grad_picked, 0.0), axis=1)
            grad_scores += tl.where(cols[None, :] == expert[:, None], grad[:, None], 0.0)
    if SOFTMAX:
        grad_logits = scores * (grad_scores - tl.sum(grad_scores * scores, axis=1)[:, None])
    else:
        grad_logits = grad_scores * scores * (1.0 - scores)
    tl.store(grad_logits_ptr + tile_offsets, grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=tile_ok)


@lazy_kernel()
def _dispatch_histogram_kernel(
    experts_ptr, block_counts_ptr, num_assignments, num_experts,
    BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0)
    ids = block * BLOCK_A + tl.arange(0, BLOCK_A)
    expert = tl.load(experts_ptr + ids, mask=ids < num_assignments, other=-1)
    cols = tl.arange(0, BLOCK_E)
    counts = tl.sum(tl.where(expert[:, None] == cols[None, :], 1, 0), axis=0)
    tl.store(block_counts_ptr + block * num_experts + cols, counts, mask=cols < num_experts)


@lazy_kernel()
def _dispatch_positions_kernel(
    experts_ptr, block_first_row_ptr, order_ptr, row_assignment_ptr, num_assignments, num_experts,
    BLOCK_A: tl.constexpr,
):
    block = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_A)
    ids = block * BLOCK_A + lanes
    valid = ids < num_assignments
    expert = tl.load(experts_ptr + ids, mask=valid, other=-1)
    # Rank among the same-expert assignments before this one in the block: keeps assignment-id order (stable).
    earlier_same = (expert[:, None] == expert[None, :]) & (lanes[None, :] < lanes[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    row = tl.load(block_first_row_ptr + block * num_experts + expert, mask=valid, other=0) + rank
    tl.store(order_ptr + ids, row, mask=valid)
    tl.store(row_assignment_ptr + row, ids, mask=valid)


@lazy_kernel()
def _tile_table_kernel(
    counts_ptr, segments_ptr, tiles_ptr, num_experts, num_rows, max_tiles,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TILES: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    counts = tl.load(counts_ptr + experts, mask=expert_ok, other=0).to(tl.int32)
    # Clamped to the rows that exist, so inconsistent counts can never send a kernel out of bounds.
    seg_end = tl.minimum(tl.cumsum(counts, axis=0), num_rows)
    seg_start = tl.minimum(seg_end - counts, seg_end)
    seg_start = tl.maximum(seg_start, 0)
    tl.store(segments_ptr + experts, seg_start, mask=expert_ok)
    tl.store(segments_ptr + num_experts + experts, seg_end, mask=expert_ok)
    num_tiles = tl.where(expert_ok, (seg_end - seg_start + BLOCK_M - 1) // BLOCK_M, 0)
    tile_end = tl.cumsum(num_tiles, axis=0)
    tile_begin = tile_end - num_tiles
    for first in range(0, max_tiles, BLOCK_TILES):
        tiles = first + tl.arange(0, BLOCK_TILES)
        # A tile's expert is the number of experts whose tiles all end at or before it (empty ones included).
        expert = tl.sum(tl.where((tile_end[None, :] <= tiles[:, None]) & expert_ok[None, :], 1, 0), axis=1)
        mine = experts[None, :] == expert[:, None]  # no column when the tile is past the last expert's
        first_row = seg_start[None, :] + (tiles[:, None] - tile_begin[None, :]) * BLOCK_M
        row_start = tl.sum(tl.where(mine, first_row, 0), axis=1)
        row_end = tl.sum(tl.where(mine, seg_end[None, :], 0), axis=1)
        tile_ok = tiles < max_tiles
        tl.store(tiles_ptr + tiles, expert, mask=tile_ok)
        tl.store(tiles_ptr + max_tiles + tiles, row_start, mask=tile_ok)
        tl.store(tiles_ptr + 2 * max_tiles + tiles, row_end, mask=tile_ok)


def _mm_configs():
    # (BLOCK_N, BLOCK_K, warps, stages): all compile for sm_90 with 64-row tiles without register spills
    # (kmodel.kernels.compile_check); 128-column tiles need 8 warps for that.
    shapes = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3),
              (64, 32, 4, 4)]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for n, k, warps, stages in shapes
    ]


@lazy_kernel(
    configs=_mm_configs(),
    key=["N", "K", "EPILOGUE", "GATHER_A", "SCALE_ROWS", "HAS_BIAS", "CLAMPED", "BLOCK_M"],
    interpret_config={"BLOCK_N": 128, "BLOCK_K": 128},
)
def _grouped_mm_kernel(
    a_ptr, b_ptr, out_ptr, gate_up_ptr, weight_grad_ptr, expert_bias_ptr,
    tiles_ptr, max_tiles, row_assignment_ptr, routing_weights_ptr, top_k,
    N, K, swiglu_alpha, swiglu_limit,
    stride_a, stride_be, stride_bk, stride_bn, stride_out, stride_gate_up, stride_weight_grad, stride_bias,
    weight_grad_cols,
    EPILOGUE: tl.constexpr, GATHER_A: tl.constexpr, SCALE_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    CLAMPED: tl.constexpr, DOT_PRECISION: tl.constexpr, PARTIAL_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of one expert's rows times B[expert] (K, N), one BLOCK_N slice of columns, then the epilogue.

    HAS_BIAS: expert_bias_ptr holds one bias row per expert (stride_bias apart), used by the epilogue:
    _PLAIN adds bias[e, cols]; _SWIGLU_FORWARD adds the gate_up bias (gate at cols, up at N + cols) before the
    activation; _SWIGLU_BACKWARD (with SCALE_ROWS) adds d_out . down_bias[e] to the routing-weight gradient.
    CLAMPED: gpt-oss's activation, gate.clamp(max=limit) * sigmoid(alpha * gate) * (up.clamp(+-limit) + 1).
    """
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tiles_ptr + tile)
    row_start = tl.load(tiles_ptr + max_tiles + tile)
    row_end = tl.load(tiles_ptr + 2 * max_tiles + tile)
    if row_start >= row_end:
        return  # past the last expert's tiles: the grid is sized by an upper bound
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    rows64 = rows.to(tl.int64)
    if GATHER_A or SCALE_ROWS:
        assignment = tl.load(row_assignment_ptr + rows, mask=row_ok, other=0)
    if GATHER_A:
        a_rows = (assignment // top_k).to(tl.int64)
    else:
        a_rows = rows64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    # Row and column offsets stay 1D across the K loop; the 2D addresses are formed per step, so no
    # (BLOCK, BLOCK) pointer tensor is held in registers through the loop.
    a_row_ptrs = a_ptr + a_rows * stride_a
    b_col_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if EPILOGUE == 1:  # _SWIGLU_FORWARD: the up rows of B start N columns after the gate rows
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if EPILOGUE == 2 and SCALE_ROWS and HAS_BIAS:  # d_out . down_bias[e], from the A rows (d_out) as they pass
        bias_dot = tl.zeros((BLOCK_M,), tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + ks
        k_ok = k < K
        a = tl.load(a_row_ptrs[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_ptrs = b_col_ptrs[None, :] + k[:, None] * stride_bk
        b_mask = k_ok[:, None] & col_ok[None, :]
        acc = dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, input_precision=DOT_PRECISION)
        if EPILOGUE == 1:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=b_mask, other=0.0)
            acc_up = dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        if EPILOGUE == 2 and SCALE_ROWS and HAS_BIAS:
            k_bias = tl.load(expert_bias_ptr + expert.to(tl.int64) * stride_bias + k, mask=k_ok, other=0.0)
            bias_dot += tl.sum(a.to(tl.float32) * k_bias.to(tl.float32)[None, :], axis=1)

    mask = row_ok[:, None] & col_ok[None, :]
    out_ptrs = (out_ptr + rows64 * stride_out)[:, None] + cols[None, :]
    if EPILOGUE == 0:  # _PLAIN
        if HAS_BIAS:
            bias = tl.load(expert_bias_ptr + expert.to(tl.int64) * stride_bias + cols, mask=col_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:  # _SWIGLU_FORWARD: keep gate_up for the backward, pass h on
        if HAS_BIAS:
            bias_ptrs = expert_bias_ptr + expert.to(tl.int64) * stride_bias + cols
            acc += tl.load(bias_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(bias_ptrs + N, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        gate_up_ptrs = (gate_up_ptr + rows64 * stride_gate_up)[:, None] + cols[None, :]
        gate = acc.to(gate_up_ptr.dtype.element_ty)
        up = acc_up.to(gate_up_ptr.dtype.element_ty)
        tl.store(gate_up_ptrs, gate, mask=mask)
        tl.store(gate_up_ptrs + N, up, mask=mask)
        if CLAMPED:
            # Clamped as stored, so the backward's clamp masks (from the saved gate_up) agree with this forward.
            gate = tl.minimum(gate.to(tl.float32), swiglu_limit)
            up = tl.minimum(tl.maximum(up.to(tl.float32), -swiglu_limit), swiglu_limit)
            h = gate * tl.sigmoid(swiglu_alpha * gate) * (up + 1.0)
        else:
            h = acc * tl.sigmoid(acc) * acc_up
        tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # _SWIGLU_BACKWARD: acc = d h (before the routing weight when SCALE_ROWS); out = d gate_up
        gate_up_ptrs = (gate_up_ptr + rows64 * stride_gate_up)[:, None] + cols[None, :]
        gate = tl.load(gate_up_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        # h = act(gate) * up_term; d h / d gate = act'(gate) * up_term, d h / d up = act(gate) (times the masks)
        if CLAMPED:
            # Gradient zero where a value was clamped; at the limit itself it passes, as torch.clamp's does.
            gate_c = tl.minimum(gate, swiglu_limit)
            sig = tl.sigmoid(swiglu_alpha * gate_c)
            act = gate_c * sig
            d_act = tl.where(gate <= swiglu_limit, sig + swiglu_alpha * act * (1.0 - sig), 0.0)
            up_term = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit) + 1.0
            d_up_term = tl.where((up >= -swiglu_limit) & (up <= swiglu_limit), act, 0.0)
        else:
            sig = tl.sigmoid(gate)
            act = gate * sig
            d_act = sig + act * (1.0 - sig)  # silu'(g) = sig + silu * (1 - sig)
            up_term = up
            d_up_term = act
        if SCALE_ROWS:
            # d loss / d routing weight = d_out . y = (d_out @ down) . h (+ d_out . down_bias[e]), summed here
            # over this column slice (the bias term once, by the first slice).
            partial = tl.sum(acc * act * up_term, axis=1)
            if HAS_BIAS:
                partial += tl.where(pid_n == 0, bias_dot, 0.0)
            # The buffer has a column per PARTIAL_BLOCK_N (the narrowest config's) slice: this slice covers
            # SPAN of them and writes its partial into the first, zeros into the rest. Every column is then
            # written by every run whatever its BLOCK_N, as it must be: autotuning runs several configs on
            # this one buffer before the winner.
            SPAN: tl.constexpr = BLOCK_N // PARTIAL_BLOCK_N
            for j in tl.static_range(SPAN):
                column = tl.zeros_like(rows) + (pid_n * SPAN + j)
                tl.store(weight_grad_ptr + rows64 * stride_weight_grad + column, tl.where(j == 0, partial, 0.0),
                         mask=row_ok & (column < weight_grad_cols))
            acc = acc * tl.load(routing_weights_ptr + assignment, mask=row_ok, other=0.0)[:, None]
        tl.store(out_ptrs + N, (acc * d_up_term).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptrs, (acc * up_term * d_act).to(out_ptr.dtype.element_ty), mask=mask)


def _weight_grad_configs():
    # (BLOCK_P, BLOCK_Q, BLOCK_R, warps, stages): all compile for sm_90 without register spills.
    shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3)]
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_R": r}, num_warps=warps, num_stages=stages)
        for p, q, r, warps, stages in shapes
    ]


@lazy_kernel(
    configs=_weight_grad_configs(),
    key=["P", "Q", "GATHER_GRAD", "INPUT_MODE", "BIAS_GRAD", "CLAMPED"],
    interpret_config={"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_R": 32},
)
def _grouped_weight_grad_kernel(
    grad_ptr, input_ptr, out_ptr, bias_grad_ptr, segments_ptr, num_experts, row_assignment_ptr,
    routing_weights_ptr, top_k,
    P, Q, swiglu_alpha, swiglu_limit, stride_grad, stride_input,
    GATHER_GRAD: tl.constexpr, INPUT_MODE: tl.constexpr, BIAS_GRAD: tl.constexpr, CLAMPED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[e] (P, Q) = grad[rows of e].T @ input[rows of e] for one (P, Q) tile: reduces along tokens.

    GATHER_GRAD: grad holds one row per token and is scaled by each row's routing weight (d y = w d out).
    BIAS_GRAD: also bias_grad[e] (P,) = the sum of grad over the rows of e, written by the first Q tile.
    CLAMPED: the recomputed h (_INPUT_SWIGLU) is gpt-oss's clamped activation.
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_q_tiles = tl.cdiv(Q, BLOCK_Q)
    ps = (pid // num_q_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = (pid % num_q_tiles) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < P
    q_ok = qs < Q
    row_start = tl.load(segments_ptr + expert)
    row_end = tl.load(segments_ptr + num_experts + expert)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), tl.float32)
    if BIAS_GRAD:
        bias_acc = tl.zeros((BLOCK_P,), tl.float32)
    for first in range(row_start, row_end, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        if GATHER_GRAD or INPUT_MODE == 1:
            assignment = tl.load(row_assignment_ptr + rows, mask=row_ok, other=0)
            token = (assignment // top_k).to(tl.int64)
        if GATHER_GRAD:
            grad_rows = token
        else:
            grad_rows = rows64
        # Loaded transposed, (P, R), so the token dimension is the dot's reduction dimension.
        grad_ptrs = grad_ptr + grad_rows[None, :] * stride_grad + ps[:, None]
        grad = tl.load(grad_ptrs, mask=p_ok[:, None] & row_ok[None, :], other=0.0)
        if GATHER_GRAD:
            routing_weight = tl.load(routing_weights_ptr + assignment, mask=row_ok, other=0.0)
            grad = (grad.to(tl.float32) * routing_weight[None, :]).to(grad_ptr.dtype.element_ty)
        if BIAS_GRAD:
            bias_acc += tl.sum(grad.to(tl.float32), axis=1)
        in_mask = row_ok[:, None] & q_ok[None, :]
        if INPUT_MODE == 2:  # _INPUT_SWIGLU: h = act(gate, up) from the saved gate_up (Q = I)
            gate_ptrs = input_ptr + rows64[:, None] * stride_input + qs[None, :]
            gate = tl.load(gate_ptrs, mask=in_mask, other=0.0).to(tl.float32)
            up = tl.load(gate_ptrs + Q, mask=in_mask, other=0.0).to(tl.float32)
            if CLAMPED:
                gate = tl.minimum(gate, swiglu_limit)
                up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit) + 1.0
                inputs = (gate * tl.sigmoid(swiglu_alpha * gate) * up).to(input_ptr.dtype.element_ty)
            else:
                inputs = (gate * tl.sigmoid(gate) * up).to(input_ptr.dtype.element_ty)
        else:
            if INPUT_MODE == 1:  # _INPUT_TOKENS
                input_rows = token
            else:
                input_rows = rows64
            inputs = tl.load(input_ptr + input_rows[:, None] * stride_input + qs[None, :], mask=in_mask, other=0.0)
        acc = dot(grad, inputs, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * P * Q + ps[:, None] * Q + qs[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])
    if BIAS_GRAD:
        if pid % num_q_tiles == 0:  # every Q tile summed the same grad rows; the first one writes
            bias_grad = bias_acc.to(bias_grad_ptr.dtype.element_ty)
            tl.store(bias_grad_ptr + expert.to(tl.int64) * P + ps, bias_grad, mask=p_ok)


@lazy_kernel()
def _gather_sum_kernel(
    rows_ptr, order_ptr, weights_ptr, out_ptr, num_tokens, hidden, stride_rows, stride_out,
    TOP_K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[token] = sum_j (weights[token, j] *) rows[order[token, j]]: a token's k expert rows, by gather."""
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    token_ok = tokens < num_tokens
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = token_ok[:, None] & (cols < hidden)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for slot in range(TOP_K):
        row = tl.load(order_ptr + tokens * TOP_K + slot, mask=token_ok, other=0).to(tl.int64)
        values = tl.load(rows_ptr + row[:, None] * stride_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            values *= tl.load(weights_ptr + tokens * TOP_K + slot, mask=token_ok, other=0.0)[:, None]
        acc += values
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@lazy_kernel()
def _combine_backward_kernel(
    grad_out_ptr, rows_ptr, order_ptr, weights_ptr, grad_rows_ptr, grad_weights_ptr,
    num_tokens, hidden, stride_grad_out, stride_rows, stride_grad_rows,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """For each of a token's k rows: d row = weight * d out, d weight = d out . row."""
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    token_ok = tokens < num_tokens
    cols = tl.arange(0, BLOCK_H)
    for slot in range(TOP_K):
        row = tl.load(order_ptr + tokens * TOP_K + slot, mask=token_ok, other=0).to(tl.int64)
        weight = tl.load(weights_ptr + tokens * TOP_K + slot, mask=token_ok, other=0.0)
        dot = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
        for start in range(0, hidden, BLOCK_H):
            col = start + cols[None, :]
            mask = token_ok[:, None] & (col < hidden)
            grad = tl.load(grad_out_ptr + tokens[:, None] * stride_grad_out + col, mask=mask, other=0.0)
            grad = grad.to(tl.float32)
            values = tl.load(rows_ptr + row[:, None] * stride_rows + col, mask=mask, other=0.0).to(tl.float32)
            dot += grad * values
            grad_row = (grad * weight[:, None]).to(grad_rows_ptr.dtype.element_ty)
            tl.store(grad_rows_ptr + row[:, None] * stride_grad_rows + col, grad_row, mask=mask)
        tl.store(grad_weights_ptr + tokens * TOP_K + slot, tl.sum(dot, axis=1), mask=token_ok)
