"""Plain-PyTorch mixture-of-experts pieces: routing, permutation, grouped SwiGLU experts, combine.

The pipeline for N tokens, E experts, top-k:
    routing = route(router_logits, bias, ...)                  # which experts, with what weights
    x_sorted, order, counts = permute(x, routing.experts, E)   # token copies grouped by expert
    y_sorted = grouped_swiglu(x_sorted, counts, gate_up_proj, down_proj)
    out = combine(y_sorted, order, routing.weights)             # weighted sum of each token's k outputs
Expert parallelism inserts its all-to-all between permute and grouped_swiglu (and back before combine),
which is why the pieces are separate. Expert weights use nn.Linear's (out, in) layout per expert:
gate_up_proj (E, 2*I, H) with the gate in rows [0, I) and the up projection in rows [I, 2I); down_proj (E, H, I).
Routing is dropless: every token's k experts are computed.

gpt-oss's experts add optional biases — gate_up_bias (E, 2*I) in the same row order, down_bias (E, H) — and
its clamped activation (`activation="clamped_swiglu"`, see `swiglu`). Its router (softmax over the top-k
logits) is `score_func="softmax"` with `norm_topk_prob=True`: renormalising the softmax over the k kept
experts gives exactly the softmax of their logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Routing(NamedTuple):
    weights: torch.Tensor  # (N, k) fp32 combine weights, after renormalisation and routed scaling
    experts: torch.Tensor  # (N, k) int64 expert indices
    scores: torch.Tensor  # (N, E) fp32 affinities (sigmoid or softmax of the logits, no bias): for the aux loss
    tokens_per_expert: torch.Tensor  # (E,) int64 assignments per expert


def top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row; ties go to the lower index (a stable, portable rule)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


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
    """Pick top_k experts per token from fp32 router logits (N, E).

    The correction bias (aux-loss-free balancing) is added for selection only and never reaches the weights.
    Group-limited routing keeps the topk_group groups whose best two biased scores sum highest.
    """
    num_tokens, num_experts = logits.shape
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if score_func == "sigmoid":
        scores = logits.sigmoid()
    elif score_func == "softmax":
        scores = logits.softmax(dim=-1)
    else:
        raise ValueError(f"unknown router score function {score_func!r}")
    choice = scores if bias is None else scores + bias.to(scores.dtype)
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        best = min(2, grouped.shape[-1])
        group_score = grouped.topk(best, dim=-1).values.sum(dim=-1)
        kept = torch.zeros_like(group_score, dtype=torch.bool)
        kept.scatter_(1, top_indices(group_score, topk_group), True)
        choice = choice.masked_fill(~kept.repeat_interleave(num_experts // n_group, dim=1), float("-inf"))
    experts = top_indices(choice, top_k)
    weights = scores.gather(1, experts)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    tokens_per_expert = torch.bincount(experts.flatten(), minlength=num_experts)
    return Routing(weights, experts, scores, tokens_per_expert)


def permute(x: torch.Tensor, experts: torch.Tensor, num_experts: int):
    """Copy each token once per chosen expert, grouped by expert id.

    Returns x_sorted (N*k, H), order (N*k,) — position of each (token, slot) assignment in x_sorted,
    flattened token-major — and tokens_per_expert (E,).
    """
    flat = experts.flatten()
    sort_idx = torch.sort(flat, stable=True).indices  # assignment ids in expert order
    x_sorted = x[sort_idx // experts.shape[1]]
    order = torch.empty_like(sort_idx)
    order[sort_idx] = torch.arange(flat.numel(), device=flat.device)
    return x_sorted, order, torch.bincount(flat, minlength=num_experts)


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, activation: str = "swiglu", alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """swiglu: silu(gate) * up. clamped_swiglu (gpt-oss): gate * sigmoid(alpha * gate) * (up + 1), after
    clamping gate to <= limit and up to [-limit, limit]. limited_swiglu (K-EXAONE 2.0's per-layer clamps):
    silu(gate) clamped to <= limit, times up clamped to [-limit, limit]."""
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "limited_swiglu":
        return F.silu(gate).clamp(max=limit) * up.clamp(-limit, limit)
    if activation == "clamped_swiglu":
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return gate * torch.sigmoid(alpha * gate) * (up + 1)
    raise ValueError(f"unknown expert activation {activation!r}")


# PolyNorm's eps (Motif's modeling code's default).
POLYNORM_EPS = 1e-6


def polynorm(x: torch.Tensor, coefficients: torch.Tensor, eps: float = POLYNORM_EPS) -> torch.Tensor:
    """PolyNorm (arXiv 2411.03884; Motif's activation): c0 N(x^3) + c1 N(x^2) + c2 N(x) + c3, with
    N(z) = z / sqrt(mean(z^2) + eps) over the last dim and `coefficients` (..., 4) = (c0, c1, c2, c3), already
    transformed by the caller (sigmoid, bias clamp, output scale). Computed in fp32 at least: cubes overflow
    bf16 early."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    z, c = x.to(dtype), coefficients.to(dtype)

    def normed(p: torch.Tensor) -> torch.Tensor:
        return p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + eps)

    out = c[..., 0:1] * normed(z**3) + c[..., 1:2] * normed(z**2) + c[..., 2:3] * normed(z) + c[..., 3:4]
    return out.to(x.dtype)


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
    polynorm_coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """down(act(gate(x), up(x))) for each expert's contiguous segment of rows (one loop step per expert).
    activation "polynorm" (Motif-3's grouped PolyNorm): polynorm(gate) * up with expert e's own
    coefficients, row e of `polynorm_coefficients` (E, 4)."""
    inter = down_proj.shape[-1]
    outputs = []
    for expert, rows in enumerate(torch.split(x_sorted, tokens_per_expert.tolist())):
        if rows.shape[0] == 0:
            continue
        # Biases join in the product's dtype, as nn.Linear's do (under autocast too: bf16 product, bf16 bias).
        gate_up = rows @ gate_up_proj[expert].t()
        if gate_up_bias is not None:
            gate_up = gate_up + gate_up_bias[expert].to(gate_up.dtype)
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        if activation == "polynorm":
            hidden = polynorm(gate, polynorm_coefficients[expert]) * up
        else:
            hidden = swiglu(gate, up, activation, swiglu_alpha, swiglu_limit)
        out = hidden @ down_proj[expert].t()
        outputs.append(out if down_bias is None else out + down_bias[expert].to(out.dtype))
    if not outputs:
        return x_sorted.new_zeros(0, down_proj.shape[1])
    return torch.cat(outputs)


def combine(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs, by gather (no atomics)."""
    num_tokens, top_k = weights.shape
    per_slot = y_sorted[order].view(num_tokens, top_k, -1)
    return (per_slot * weights.to(y_sorted.dtype).unsqueeze(-1)).sum(dim=1)


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
    polynorm_coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed-expert output for tokens x (N, H) given their routing: permute, grouped SwiGLU, combine."""
    x_sorted, order, counts = permute(x, experts, gate_up_proj.shape[0])
    y_sorted = grouped_swiglu(
        x_sorted,
        counts,
        gate_up_proj,
        down_proj,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        activation=activation,
        swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit,
        polynorm_coefficients=polynorm_coefficients,
    )
    return combine(y_sorted, order, weights)
