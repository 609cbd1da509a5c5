"""Triton mixture-of-experts: router, device-side dispatch, grouped SwiGLU GEMMs and gather combine.

Same functions and semantics as `reference.py` (route, permute, grouped_swiglu, combine, moe_experts), each
differentiable where the reference is. Nothing here reads a device value on the host: token counts, prefix
sums and tile tables stay on the GPU, and grids are sized by host-known upper bounds whose surplus programs
exit at once.

Router (`route`): one launch scores a block of tokens (sigmoid or softmax), adds the correction bias for
selection only, keeps the best `topk_group` groups, picks top-k by repeated arg-max (ties to the lower index,
as the reference's stable sort), renormalises and scales the weights, and writes per-block expert counts that
one torch sum turns into tokens_per_expert. The backward is one launch too.

Dispatch: a histogram kernel counts each block of (token, slot) assignments per expert; cumulative sums give
every block its first row in each expert's segment; a second kernel ranks each assignment among the
same-expert ones before it in its block (stable) and writes order / row_assignment. A one-program kernel then
cuts each expert's segment into BLOCK_M-row tiles (segments padded to the block size in the tile grid, not
in memory) and writes the (expert, first row, end row) of every tile.

Expert MLP, per tile of one expert's rows and one slice of output columns:
    gate_up = x[rows] @ gate_up_proj[e].T (+ gate_up_bias[e]), h = act(gate, up)   (gather of x fused in)
    y       = h @ down_proj[e].T (+ down_bias[e])
act is silu(gate) * up, or gpt-oss's clamped_swiglu: g * sigmoid(alpha * g) * (u + 1) with g = gate clamped to
<= limit and u = up clamped to [-limit, limit]. The biases are added in the GEMM epilogues. The forward keeps
gate_up (with its bias, before any clamp: needed by the activation's backward) and never h, which the backward
recomputes from gate_up where it needs it. Backward:
    d_h -> d_gate_up  = act'(d_out[rows] @ down_proj[e])             (activation backward in the epilogue; the
                                                                      clamp's gradient is 0 where it clamped)
    dx_sorted         = d_gate_up @ gate_up_proj[e]
    d gate_up_proj[e] = d_gate_up[rows].T @ x[rows]                    (grouped along tokens, no atomics)
    d down_proj[e]    = d_y[rows].T @ h[rows]                          (h recomputed from gate_up in the loads)
    d gate_up_bias[e], d down_bias[e] = column sums of d_gate_up[rows] and d_y[rows], in those two kernels
In `moe_experts` the combine weights never touch y: the down GEMM's backward reads d_out per token and scales
by the routing weight in its epilogue, which also yields d weight = (d_out @ down_proj[e]) . h
(+ d_out . down_bias[e], reduced from the d_out rows as its K loop loads them), so y_sorted is neither kept
for the backward nor is a d_y_sorted tensor ever formed.

Combine: each token gathers its k rows and sums them with its weights (no atomics); its backward, and the
backward of permute, are the same kind of gather.

The kernel bodies live in `triton_kernels.py`; this module holds their launchers, the autograd Functions and
the public functions (as attention is split).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from kmodel.kernels.moe.reference import Routing
from kmodel.kernels.moe.triton_kernels import (
    _INPUT_ROWS,
    _INPUT_SWIGLU,
    _INPUT_TOKENS,
    _PLAIN,
    _SWIGLU_BACKWARD,
    _SWIGLU_FORWARD,
    _combine_backward_kernel,
    _dispatch_histogram_kernel,
    _dispatch_positions_kernel,
    _gather_sum_kernel,
    _grouped_mm_kernel,
    _grouped_weight_grad_kernel,
    _route_backward_kernel,
    _route_kernel,
    _tile_table_kernel,
)
from kmodel.kernels.triton_support import check_device, dot_precision, interpreting, matmul_dtype

__all__ = ["Routing", "route", "permute", "grouped_swiglu", "combine", "moe_experts"]

_MAX_EXPERTS = 1024  # the router holds a token's scores for all experts in one block


class _Activation(NamedTuple):
    """The expert activation: swiglu, or gpt-oss's clamped_swiglu with its sigmoid gain and clamp limit."""

    clamped: bool
    alpha: float
    limit: float


_SWIGLU = _Activation(False, 1.702, 7.0)  # alpha and limit unused
_ACTIVATIONS = ("swiglu", "clamped_swiglu")


# --------------------------------------------------------------------------------------------------- router


def _route_block_t(num_experts: int) -> int:
    # About 2k scores per block on GPU: more spills registers (seen compiling for sm_90).
    return 16 if interpreting() else max(1, min(64, 2048 // triton.next_power_of_2(num_experts)))


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, top_k, softmax, n_group, topk_group, normalize, scaling):
        num_tokens, num_experts = logits.shape
        device = logits.device
        block_t = _route_block_t(num_experts)
        num_blocks = triton.cdiv(num_tokens, block_t)
        scores = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=device)
        weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
        experts = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
        block_counts = torch.zeros(num_blocks, num_experts, dtype=torch.int32, device=device)
        if num_tokens > 0:
            _route_kernel[(num_blocks,)](
                logits, bias if bias is not None else scores, scores, weights, experts, block_counts,
                num_tokens, num_experts, scaling, logits.stride(0),
                TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_SIZE=num_experts // n_group,
                SOFTMAX=softmax, HAS_BIAS=bias is not None, NORMALIZE=normalize,
                BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(num_experts),
                BLOCK_K=triton.next_power_of_2(top_k), BLOCK_G=triton.next_power_of_2(n_group),
            )
        tokens_per_expert = block_counts.sum(0, dtype=torch.int64)
        ctx.save_for_backward(scores, experts)
        ctx.options = (top_k, softmax, normalize, scaling, logits.dtype)
        ctx.mark_non_differentiable(experts, tokens_per_expert)
        ctx.set_materialize_grads(False)
        return weights, experts, scores, tokens_per_expert

    @staticmethod
    def backward(ctx, grad_weights, _grad_experts, grad_scores, _grad_counts):
        scores, experts = ctx.saved_tensors
        top_k, softmax, normalize, scaling, logits_dtype = ctx.options
        num_tokens, num_experts = scores.shape
        grad_logits = torch.empty(num_tokens, num_experts, dtype=logits_dtype, device=scores.device)
        if grad_weights is None and grad_scores is None:
            return grad_logits.zero_(), None, None, None, None, None, None, None
        block_t = _route_block_t(num_experts)
        if num_tokens > 0:
            _route_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
                scores, experts,
                grad_weights.contiguous() if grad_weights is not None else scores,
                grad_scores.contiguous() if grad_scores is not None else scores,
                grad_logits, num_tokens, num_experts, scaling,
                TOP_K=top_k, SOFTMAX=softmax, NORMALIZE=normalize,
                HAS_GRAD_WEIGHTS=grad_weights is not None, HAS_GRAD_SCORES=grad_scores is not None,
                BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
            )
        return grad_logits, None, None, None, None, None, None, None


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    score_func: str = "sigmoid",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Routing:
    """Pick top_k experts per token from router logits (N, E) in one launch; see reference.route."""
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be (tokens, experts), got shape {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"unknown router score function {score_func!r}")
    if not 1 <= num_experts <= _MAX_EXPERTS:
        raise ValueError(f"route: {num_experts} experts; the Triton router supports 1..{_MAX_EXPERTS}")
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"route: n_group={n_group} must be >= 1 and divide the {num_experts} experts")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"route: topk_group={topk_group} must be in [1, n_group={n_group}]")
    kept_experts = num_experts if n_group == 1 else topk_group * (num_experts // n_group)
    if not 1 <= top_k <= kept_experts:
        raise ValueError(
            f"route: top_k={top_k} must be in [1, {kept_experts}] (the experts in the topk_group={topk_group} "
            f"kept groups of {num_experts // n_group})"
        )
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"route: bias shape {tuple(bias.shape)} does not match the {num_experts} experts")
    check_device(logits)
    weights, experts, scores, tokens_per_expert = _Route.apply(
        logits if logits.stride(-1) == 1 else logits.contiguous(),
        bias.detach().contiguous() if bias is not None else None,
        top_k, score_func == "softmax", n_group, topk_group, norm_topk_prob, float(routed_scaling_factor),
    )
    return Routing(weights, experts, scores, tokens_per_expert)


# ------------------------------------------------------------------------------------------------- dispatch


class _Layout(NamedTuple):
    """Where each expert's rows lie in the expert-sorted order and how the grouped GEMMs tile them."""

    num_rows: int  # M: sorted rows (token, slot assignments)
    block_m: int  # rows per GEMM tile; each tile holds rows of one expert only
    segments: torch.Tensor  # (2, E) int32: first and end row of each expert
    tiles: torch.Tensor  # (3, max_tiles) int32: expert, first row, end row of each tile (empty past the last)
    # (M,) int32 assignment id of each row (token = id // top_k) and row of each assignment; both None when
    # the sorted rows are given (grouped_swiglu) rather than gathered from tokens.
    row_assignment: torch.Tensor | None
    order: torch.Tensor | None
    top_k: int


def _block_m() -> int:
    """Rows per grouped-GEMM tile. 64 on GPU: compiled for sm_90, 128-row tiles spill registers in the SwiGLU
    epilogues, and short expert segments waste less of a 64-row tile."""
    return 32 if interpreting() else 64


def _tile_layout(counts: torch.Tensor, num_rows: int, top_k: int, row_assignment=None, order=None) -> _Layout:
    num_experts = counts.shape[0]
    block_m = _block_m()
    max_tiles = triton.cdiv(num_rows, block_m) + num_experts  # each expert adds at most one partial tile
    segments = torch.empty(2, num_experts, dtype=torch.int32, device=counts.device)
    tiles = torch.empty(3, max_tiles, dtype=torch.int32, device=counts.device)
    _tile_table_kernel[(1,)](
        counts, segments, tiles, num_experts, num_rows, max_tiles,
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_TILES=16 if interpreting() else 32,
    )
    return _Layout(num_rows, block_m, segments, tiles, row_assignment, order, top_k)


def _dispatch(experts: torch.Tensor, num_experts: int) -> tuple[_Layout, torch.Tensor]:
    """Expert-sorted layout of the (token, slot) assignments in `experts` (N, k), and tokens per expert."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    num_rows = flat.numel()
    device = experts.device
    block_a = 32 if interpreting() else 128
    num_blocks = max(triton.cdiv(num_rows, block_a), 1)
    block_counts = torch.zeros(num_blocks, num_experts, dtype=torch.int32, device=device)
    order = torch.empty(num_rows, dtype=torch.int32, device=device)
    row_assignment = torch.empty(num_rows, dtype=torch.int32, device=device)
    if num_rows > 0:
        _dispatch_histogram_kernel[(num_blocks,)](
            flat, block_counts, num_rows, num_experts, BLOCK_A=block_a, BLOCK_E=triton.next_power_of_2(num_experts)
        )
    counts = block_counts.sum(0, dtype=torch.int64)
    expert_first_row = counts.cumsum(0) - counts
    block_first_row = (block_counts.cumsum(0) - block_counts + expert_first_row).to(torch.int32)
    if num_rows > 0:
        _dispatch_positions_kernel[(num_blocks,)](
            flat, block_first_row, order, row_assignment, num_rows, num_experts, BLOCK_A=block_a
        )
    return _tile_layout(counts, num_rows, top_k, row_assignment, order), counts


# --------------------------------------------------------------------------------------------- grouped GEMMs


def _narrowest_block_n() -> int:
    configs = [config.kwargs for config in _grouped_mm_kernel.configs] + [_grouped_mm_kernel.interpret_config]
    return min(config["BLOCK_N"] for config in configs)


def _grouped_mm(
    a: torch.Tensor,
    weight: torch.Tensor,
    layout: _Layout,
    *,
    transpose: bool,
    epilogue: int = _PLAIN,
    gather: bool = False,
    gate_up: torch.Tensor | None = None,
    routing_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    act: _Activation = _SWIGLU,
):
    """For each expert e: its rows of `a` times weight[e].T (transpose) or weight[e], then the epilogue.

    gather: `a` holds one row per token, and sorted row r reads token row_assignment[r] // top_k.
    _PLAIN returns out (+ bias[e]). _SWIGLU_FORWARD (weight = gate_up_proj (E, 2I, H), bias = gate_up_bias
    (E, 2I)) returns (h, gate_up), gate_up with its bias and before any clamp. _SWIGLU_BACKWARD (weight =
    down_proj (E, H, I), `a` = d y, gate_up saved by the forward) returns (d gate_up, d routing weight per sorted
    row); with routing_weights, d y = weight * d out[token], and bias = down_bias (E, H) enters d weight.
    """
    _, rows_b, cols_b = weight.shape
    k_dim, n_dim = (cols_b, rows_b) if transpose else (rows_b, cols_b)
    stride_bk, stride_bn = (1, cols_b) if transpose else (cols_b, 1)
    if epilogue == _SWIGLU_FORWARD:
        n_dim //= 2
        gate_up = torch.empty(layout.num_rows, 2 * n_dim, dtype=a.dtype, device=a.device)
    out_cols = 2 * n_dim if epilogue == _SWIGLU_BACKWARD else n_dim
    out = torch.empty(layout.num_rows, out_cols, dtype=a.dtype, device=a.device)
    scale_rows = routing_weights is not None
    # Routing-weight gradient partials: a column per slice of the narrowest config, each written by every run
    # (see the kernel), so no zeroing and nothing left over from autotuning's earlier configs.
    partial_block_n = _narrowest_block_n()
    weight_grad = (
        torch.empty(layout.num_rows, triton.cdiv(n_dim, partial_block_n), dtype=torch.float32, device=a.device)
        if scale_rows else None
    )
    max_tiles = layout.tiles.shape[1]
    if layout.num_rows > 0:
        _grouped_mm_kernel[lambda meta: (max_tiles, triton.cdiv(n_dim, meta["BLOCK_N"]))](
            a, weight, out,
            gate_up if gate_up is not None else out,
            weight_grad if scale_rows else out,
            bias if bias is not None else out,
            layout.tiles, max_tiles,
            layout.row_assignment if layout.row_assignment is not None else layout.tiles,
            routing_weights if scale_rows else out,
            layout.top_k, n_dim, k_dim, act.alpha, act.limit,
            a.stride(0), weight.stride(0), stride_bk, stride_bn, out.stride(0),
            gate_up.stride(0) if gate_up is not None else 0,
            weight_grad.stride(0) if scale_rows else 0,
            bias.stride(0) if bias is not None else 0,
            weight_grad.shape[1] if scale_rows else 0,
            EPILOGUE=epilogue, GATHER_A=gather, SCALE_ROWS=scale_rows, HAS_BIAS=bias is not None,
            CLAMPED=act.clamped and epilogue != _PLAIN, DOT_PRECISION=dot_precision(a.dtype),
            PARTIAL_BLOCK_N=partial_block_n, BLOCK_M=layout.block_m,
        )
    if epilogue == _SWIGLU_FORWARD:
        return out, gate_up
    if epilogue == _SWIGLU_BACKWARD:
        return out, weight_grad.sum(1) if scale_rows else None
    return out


def _grouped_weight_grad(
    grad: torch.Tensor,
    inputs: torch.Tensor,
    layout: _Layout,
    out_shape: tuple[int, int, int],
    *,
    input_mode: int,
    routing_weights: torch.Tensor | None = None,
    bias_grad: bool = False,
    act: _Activation = _SWIGLU,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(E, P, Q) weight gradient, expert e = grad[its rows].T @ input[its rows]; routing_weights: grad is
    d out per token, gathered and scaled per row. With bias_grad also the (E, P) bias gradient, the sum of each
    expert's grad rows (else None)."""
    num_experts, p_dim, q_dim = out_shape
    out = torch.empty(out_shape, dtype=grad.dtype, device=grad.device)
    d_bias = torch.empty(num_experts, p_dim, dtype=grad.dtype, device=grad.device) if bias_grad else None
    gather_grad = routing_weights is not None
    _grouped_weight_grad_kernel[
        lambda meta: (triton.cdiv(p_dim, meta["BLOCK_P"]) * triton.cdiv(q_dim, meta["BLOCK_Q"]), num_experts)
    ](
        grad, inputs, out, d_bias if bias_grad else out, layout.segments, num_experts,
        layout.row_assignment if layout.row_assignment is not None else layout.segments,
        routing_weights if gather_grad else grad, layout.top_k,
        p_dim, q_dim, act.alpha, act.limit, grad.stride(0), inputs.stride(0),
        GATHER_GRAD=gather_grad, INPUT_MODE=input_mode, BIAS_GRAD=bias_grad,
        CLAMPED=act.clamped and input_mode == _INPUT_SWIGLU, DOT_PRECISION=dot_precision(grad.dtype),
    )
    return out, d_bias


# ---------------------------------------------------------------------------------------- gather and combine


def _token_block(num_tokens: int, hidden: int) -> tuple[int, int]:
    """(tokens, columns) per program for the per-token gathers: one token on GPU, a big 2D block under the
    interpreter (its cost is per program and per instruction)."""
    if interpreting():
        return min(triton.next_power_of_2(max(num_tokens, 1)), 32), min(triton.next_power_of_2(hidden), 256)
    return 1, min(triton.next_power_of_2(hidden), 1024)


def _gather_sum(rows: torch.Tensor, order: torch.Tensor, top_k: int, weights: torch.Tensor | None = None):
    num_tokens = order.shape[0] // top_k
    hidden = rows.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=rows.dtype, device=rows.device)
    block_t, block_h = _token_block(num_tokens, hidden)
    if num_tokens > 0:
        _gather_sum_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))](
            rows, order, weights if weights is not None else rows, out, num_tokens, hidden,
            rows.stride(0), out.stride(0), TOP_K=top_k, WEIGHTED=weights is not None,
            BLOCK_T=block_t, BLOCK_H=block_h,
        )
    return out


# ------------------------------------------------------------------------------------ autograd Functions


def _expert_mlp_forward(x, layout: _Layout, gate_up_proj, down_proj, gate_up_bias, down_bias, act, *, gather: bool):
    """(y_sorted, gate_up): the grouped SwiGLU MLP of each sorted row; gather: x holds one row per token."""
    hidden, gate_up = _grouped_mm(
        x, gate_up_proj, layout, transpose=True, epilogue=_SWIGLU_FORWARD, gather=gather, bias=gate_up_bias, act=act
    )
    return _grouped_mm(hidden, down_proj, layout, transpose=True, bias=down_bias), gate_up


def _expert_mlp_backward(
    grad, x, layout: _Layout, gate_up, gate_up_proj, down_proj, needs, act, routing_weights=None, down_bias=None
):
    """Gradients of the expert MLP: (d x_sorted, d routing weight per row, d gate_up_proj, d down_proj,
    d gate_up_bias, d down_bias).

    With routing_weights (the fused moe_experts path) grad and x hold one row per token and each sorted row's
    d y is its routing weight times its token's grad; otherwise grad is d y_sorted and x is x_sorted.
    down_bias: the fused path's down bias, which is part of y and so of d routing weight.
    needs: (x, gate_up_proj, down_proj, gate_up_bias, down_bias) gradient flags.
    """
    fused = routing_weights is not None
    need_x, need_gate_up_proj, need_down_proj, need_gate_up_bias, need_down_bias = needs
    d_gate_up, d_row_weight = _grouped_mm(
        grad, down_proj, layout, transpose=False, epilogue=_SWIGLU_BACKWARD, gather=fused,
        gate_up=gate_up, routing_weights=routing_weights, bias=down_bias if fused else None, act=act,
    )
    d_x_sorted = _grouped_mm(d_gate_up, gate_up_proj, layout, transpose=False) if need_x else None
    # A bias gradient is the column sum of its weight gradient's left operand, reduced in the same kernel.
    d_gate_up_proj = d_down_proj = d_gate_up_bias = d_down_bias = None
    if need_gate_up_proj or need_gate_up_bias:
        d_gate_up_proj, d_gate_up_bias = _grouped_weight_grad(
            d_gate_up, x, layout, gate_up_proj.shape, input_mode=_INPUT_TOKENS if fused else _INPUT_ROWS,
            bias_grad=need_gate_up_bias,
        )
    if need_down_proj or need_down_bias:
        d_down_proj, d_down_bias = _grouped_weight_grad(
            grad, gate_up, layout, down_proj.shape, input_mode=_INPUT_SWIGLU, routing_weights=routing_weights,
            bias_grad=need_down_bias, act=act,
        )
    return (
        d_x_sorted, d_row_weight, d_gate_up_proj if need_gate_up_proj else None,
        d_down_proj if need_down_proj else None, d_gate_up_bias, d_down_bias,
    )


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, experts, num_experts):
        layout, counts = _dispatch(experts, num_experts)
        x_sorted = x.index_select(0, layout.row_assignment // experts.shape[1])
        ctx.save_for_backward(layout.order)
        ctx.top_k = experts.shape[1]
        order = layout.order.to(torch.int64)
        ctx.mark_non_differentiable(order, counts)
        return x_sorted, order, counts

    @staticmethod
    def backward(ctx, grad_x_sorted, _grad_order, _grad_counts):
        (order,) = ctx.saved_tensors
        return _gather_sum(grad_x_sorted.contiguous(), order, ctx.top_k), None, None


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_sorted, tokens_per_expert, gate_up_proj, down_proj, gate_up_bias, down_bias, act):
        layout = _tile_layout(tokens_per_expert, x_sorted.shape[0], top_k=1)
        y_sorted, gate_up = _expert_mlp_forward(
            x_sorted, layout, gate_up_proj, down_proj, gate_up_bias, down_bias, act, gather=False
        )
        ctx.save_for_backward(x_sorted, gate_up, gate_up_proj, down_proj, *layout[2:4])
        ctx.layout_sizes = (layout.num_rows, layout.block_m)
        ctx.act = act
        return y_sorted

    @staticmethod
    def backward(ctx, grad_y_sorted):
        x_sorted, gate_up, gate_up_proj, down_proj, segments, tiles = ctx.saved_tensors
        layout = _Layout(*ctx.layout_sizes, segments, tiles, None, None, 1)
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:6])
        d_x_sorted, _, *d_params = _expert_mlp_backward(
            grad_y_sorted.contiguous(), x_sorted, layout, gate_up, gate_up_proj, down_proj, needs, ctx.act
        )
        return d_x_sorted, None, *d_params, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, order, weights):
        ctx.save_for_backward(y_sorted, order, weights)
        return _gather_sum(y_sorted, order, weights.shape[1], weights)

    @staticmethod
    def backward(ctx, grad_out):
        y_sorted, order, weights = ctx.saved_tensors
        num_tokens, top_k = weights.shape
        grad_out = grad_out.contiguous()
        # Every row of y_sorted belongs to exactly one (token, slot), so each is written once.
        grad_y_sorted = torch.empty_like(y_sorted)
        grad_weights = torch.empty_like(weights)
        if num_tokens > 0:
            hidden = y_sorted.shape[1]
            block_t, block_h = _token_block(num_tokens, hidden)
            _combine_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
                grad_out, y_sorted, order, weights, grad_y_sorted, grad_weights,
                num_tokens, hidden, grad_out.stride(0), y_sorted.stride(0), grad_y_sorted.stride(0),
                TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h,
            )
        return grad_y_sorted, None, grad_weights


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, act):
        layout, _ = _dispatch(experts, gate_up_proj.shape[0])
        y_sorted, gate_up = _expert_mlp_forward(
            x, layout, gate_up_proj, down_proj, gate_up_bias, down_bias, act, gather=True
        )
        out = _gather_sum(y_sorted, layout.order, layout.top_k, weights)
        # y_sorted is not kept: the backward gets d weight from d out, down_proj, h and down_bias (module doc).
        ctx.save_for_backward(x, weights, gate_up, gate_up_proj, down_proj, down_bias, *layout[2:6])
        ctx.layout_sizes = (layout.num_rows, layout.block_m)
        ctx.act = act
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, gate_up, gate_up_proj, down_proj, down_bias, segments, tiles, row_assignment, order = (
            ctx.saved_tensors
        )
        num_tokens, top_k = weights.shape
        layout = _Layout(*ctx.layout_sizes, segments, tiles, row_assignment, order, top_k)
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:7])
        d_x_sorted, d_row_weight, *d_params = _expert_mlp_backward(
            grad_out.contiguous(), x, layout, gate_up, gate_up_proj, down_proj, needs, ctx.act,
            routing_weights=weights, down_bias=down_bias,
        )
        d_x = _gather_sum(d_x_sorted, order, top_k) if d_x_sorted is not None else None
        d_weights = d_row_weight[order].view(num_tokens, top_k) if ctx.needs_input_grad[2] else None
        return d_x, None, d_weights, *d_params, None


# ---------------------------------------------------------------------------------------- public functions


def _check_expert_weights(op: str, hidden: int, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            f"{op}: gate_up_proj must be (E, 2I, H) and down_proj (E, H, I), got "
            f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
        )
    num_experts, inter = down_proj.shape[0], down_proj.shape[2]
    if gate_up_proj.shape != (num_experts, 2 * inter, hidden) or down_proj.shape != (num_experts, hidden, inter):
        raise ValueError(
            f"{op}: expert weights {tuple(gate_up_proj.shape)} / {tuple(down_proj.shape)} do not match "
            f"(E, 2I, H) / (E, H, I) with hidden size H={hidden}"
        )


def _expert_options(
    op: str,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    swiglu_alpha: float,
    swiglu_limit: float,
) -> _Activation:
    """Check the gpt-oss expert options against the weights; the activation as the kernels take it."""
    num_experts, double_inter, hidden = gate_up_proj.shape
    if gate_up_bias is not None and gate_up_bias.shape != (num_experts, double_inter):
        raise ValueError(
            f"{op}: gate_up_bias shape {tuple(gate_up_bias.shape)} does not match (E, 2I) = "
            f"{(num_experts, double_inter)}"
        )
    if down_bias is not None and down_bias.shape != (num_experts, hidden):
        raise ValueError(
            f"{op}: down_bias shape {tuple(down_bias.shape)} does not match (E, H) = {(num_experts, hidden)}"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}")
    if activation == "swiglu":
        return _SWIGLU
    return _Activation(True, float(swiglu_alpha), float(swiglu_limit))


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype).contiguous()


def _check_experts_index(op: str, experts: torch.Tensor, num_tokens: int, num_experts: int) -> None:
    if experts.dim() != 2 or experts.shape[0] != num_tokens or experts.shape[1] < 1:
        raise ValueError(f"{op}: experts must be (tokens={num_tokens}, top_k), got {tuple(experts.shape)}")
    if experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: experts must be int32 or int64, got {experts.dtype}")
    # Checked on the device (no host sync): an out-of-range id would otherwise write outside the outputs.
    torch._assert_async(
        ((experts >= 0) & (experts < num_experts)).all(), f"{op}: an expert id is outside [0, {num_experts})"
    )


def permute(x: torch.Tensor, experts: torch.Tensor, num_experts: int):
    """x_sorted (N*k, H), order (N*k,), tokens_per_expert (E,): see reference.permute. Metadata on device."""
    if x.dim() != 2:
        raise ValueError(f"permute: x must be (tokens, hidden), got shape {tuple(x.shape)}")
    _check_experts_index("permute", experts, x.shape[0], num_experts)
    check_device(x, experts)
    return _Permute.apply(x, experts.contiguous(), num_experts)


def grouped_swiglu(
    x_sorted: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "swiglu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """down(act(gate(x), up(x))) per expert segment of x_sorted, as grouped GEMMs, with gpt-oss's optional
    expert biases and clamped activation; see the reference."""
    if x_sorted.dim() != 2:
        raise ValueError(f"grouped_swiglu: x_sorted must be (rows, hidden), got shape {tuple(x_sorted.shape)}")
    _check_expert_weights("grouped_swiglu", x_sorted.shape[1], gate_up_proj, down_proj)
    act = _expert_options(
        "grouped_swiglu", gate_up_proj, down_proj, gate_up_bias, down_bias, activation, swiglu_alpha, swiglu_limit
    )
    if tokens_per_expert.shape != (gate_up_proj.shape[0],):
        raise ValueError(
            f"grouped_swiglu: tokens_per_expert shape {tuple(tokens_per_expert.shape)} does not match the "
            f"{gate_up_proj.shape[0]} experts"
        )
    biases = [bias for bias in (gate_up_bias, down_bias) if bias is not None]
    check_device(x_sorted, tokens_per_expert, gate_up_proj, down_proj, *biases)
    torch._assert_async(
        tokens_per_expert.sum() == x_sorted.shape[0],
        f"grouped_swiglu: tokens_per_expert does not add up to the {x_sorted.shape[0]} rows of x_sorted",
    )
    dtype = matmul_dtype("grouped_swiglu", x_sorted, gate_up_proj, down_proj, *biases)
    return _GroupedSwiGLU.apply(
        x_sorted.to(dtype).contiguous(), tokens_per_expert.contiguous(),
        gate_up_proj.to(dtype).contiguous(), down_proj.to(dtype).contiguous(),
        _cast(gate_up_bias, dtype), _cast(down_bias, dtype), act,
    )


def combine(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k expert rows, by gather; see reference.combine."""
    if weights.dim() != 2 or y_sorted.dim() != 2 or order.shape != (weights.numel(),):
        raise ValueError(
            f"combine: expected y_sorted (N*k, H), order (N*k,), weights (N, k), got {tuple(y_sorted.shape)}, "
            f"{tuple(order.shape)}, {tuple(weights.shape)}"
        )
    check_device(y_sorted, order, weights)
    return _Combine.apply(y_sorted.contiguous(), order.contiguous(), weights.contiguous())


def moe_experts(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "swiglu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """The routed-expert output for tokens x (N, H): fused dispatch, grouped SwiGLU and combine; the gpt-oss
    options as in the reference."""
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be (tokens, hidden), got shape {tuple(x.shape)}")
    _check_expert_weights("moe_experts", x.shape[1], gate_up_proj, down_proj)
    act = _expert_options(
        "moe_experts", gate_up_proj, down_proj, gate_up_bias, down_bias, activation, swiglu_alpha, swiglu_limit
    )
    _check_experts_index("moe_experts", experts, x.shape[0], gate_up_proj.shape[0])
    if weights.shape != experts.shape:
        raise ValueError(f"moe_experts: weights shape {tuple(weights.shape)} != experts shape {tuple(experts.shape)}")
    biases = [bias for bias in (gate_up_bias, down_bias) if bias is not None]
    check_device(x, experts, weights, gate_up_proj, down_proj, *biases)
    dtype = matmul_dtype("moe_experts", x, gate_up_proj, down_proj, *biases)
    return _MoEExperts.apply(
        x.to(dtype).contiguous(), experts.contiguous(), weights.float().contiguous(),
        gate_up_proj.to(dtype).contiguous(), down_proj.to(dtype).contiguous(),
        _cast(gate_up_bias, dtype), _cast(down_bias, dtype), act,
    )
