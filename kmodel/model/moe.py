"""Feed-forward blocks: the dense SwiGLU MLP and the fine-grained mixture of experts.

The MoE layer routes each token to `num_experts_per_tok` of `num_experts` experts (sigmoid scores with
an aux-loss-free correction bias, or softmax), optionally limited to the best `topk_group` of `n_group`
expert groups, runs the experts dropless through the kernels package, and adds the always-on shared
experts. Balancing: the correction bias is nudged toward uniform load from the tokens each expert
received since the last update (outside the gradient), and/or an auxiliary loss and router z-loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kmodel.config import ModelConfig
from kmodel.kernels.moe import reference
from kmodel.model.norm import RMSNorm
from kmodel.model.polynorm import PolyNorm, polynorm_coefficients


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); with `swiglu_limit`, silu(gate) <= limit and |up| <= limit
    (the kernels' limited_swiglu); with `act_fn` (Motif's PolyNorm), down(act_fn(gate(x)) * up(x))."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        swiglu_limit: float | None = None,
        act_fn: PolyNorm | None = None,
    ):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.swiglu_limit = swiglu_limit
        self.act_fn = act_fn

    @classmethod
    def of(cls, cfg: ModelConfig, intermediate_size: int, swiglu_limit: float | None = None) -> MLP:
        """The config's MLP: SwiGLU, or PolyNorm when `mlp_activation` says so."""
        act_fn = PolyNorm(cfg) if cfg.mlp_activation == "polynorm" else None
        return cls(cfg.hidden_size, intermediate_size, swiglu_limit, act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act_fn is not None:
            return self.down_proj(self.act_fn(gate) * up)
        if self.swiglu_limit is None:
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(reference.swiglu(gate, up, "limited_swiglu", limit=self.swiglu_limit))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.empty(cfg.num_experts)) if cfg.router_bias else None  # learned (gpt-oss)
        # Aux-loss-free balancing bias: used for selection only, updated outside the gradient.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # router math in fp32 at least
        return F.linear(x.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))


class Experts(nn.Module):
    """The routed experts' weights as two stacked tensors (and, with `expert_bias`, their biases:
    gate_up_proj_bias (E, 2I), down_proj_bias (E, H); with PolyNorm, each expert's coefficients: polynorm_weight
    (E, 3), polynorm_bias (E, 1), Motif-3's grouped PolyNorm). Row j holds global expert `first_expert + j`: all
    experts (first_expert 0), or one rank's consecutive shard under expert parallelism (`keep_experts`)."""

    TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias", "polynorm_weight", "polynorm_bias")

    def __init__(self, cfg: ModelConfig, swiglu_limit: float | None = None):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i)) if cfg.expert_bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(e, h)) if cfg.expert_bias else None
        grouped_polynorm = cfg.mlp_activation == "polynorm"
        self.polynorm_weight = nn.Parameter(torch.empty(e, 3)) if grouped_polynorm else None
        self.polynorm_bias = nn.Parameter(torch.empty(e, 1)) if grouped_polynorm else None
        self.first_expert = 0
        self.cfg = cfg
        self.swiglu_limit = swiglu_limit

    @torch.no_grad()
    def keep_experts(self, first: int, count: int) -> None:
        """Keep only global experts [first, first + count) (on the meta device this allocates nothing)."""
        for name in self.TENSORS:
            full = getattr(self, name)
            if full is not None:
                shard = full[first - self.first_expert : first - self.first_expert + count].clone()
                setattr(self, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        self.first_expert = first

    def forward(self, tokens: torch.Tensor, routing: reference.Routing, kernel) -> torch.Tensor:
        # A module call (not bare parameter access) so ZeRO-3 gathers the expert weights for it.
        return kernel.moe_experts(
            tokens, routing.experts, routing.weights, self.gate_up_proj, self.down_proj, **self.kernel_options()
        )

    def kernel_options(self) -> dict:
        """The expert kernel's keyword arguments beyond plain SwiGLU: only those the config switches on, so a
        kernel without gpt-oss support still serves every other config."""
        options = {}
        if self.gate_up_proj_bias is not None:
            options.update(gate_up_bias=self.gate_up_proj_bias, down_bias=self.down_proj_bias)
        if self.polynorm_weight is not None:
            coefficients = polynorm_coefficients(self.polynorm_weight, self.polynorm_bias, self.cfg, routed=True)
            options.update(activation="polynorm", polynorm_coefficients=coefficients)
        elif self.cfg.expert_activation != "swiglu":
            options.update(
                activation=self.cfg.expert_activation,
                swiglu_alpha=self.cfg.swiglu_alpha,
                swiglu_limit=self.cfg.swiglu_limit,
            )
        elif self.swiglu_limit is not None:
            options.update(activation="limited_swiglu", swiglu_limit=self.swiglu_limit)
        return options


class TokenMask(NamedTuple):
    """Which positions of a forward count in its MoE statistics (expert loads, balance loss, router z-loss), for
    a forward holding a part of its rows whose last positions the whole rows drop (context-parallel MTP).
    `valid` (seq,) marks them; `row_tokens` is this part's share of a whole row's counted positions (the whole
    row's count x this part's fraction of the row), what its token means divide by, so that the parts' mean of
    a statistic is the whole rows'."""

    valid: torch.Tensor
    row_tokens: float


class MoE(nn.Module):
    """`swiglu_limit` clamps the routed and the shared experts' SwiGLU (K-EXAONE 2.0's per-layer clamp)."""

    def __init__(self, cfg: ModelConfig, swiglu_limit: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg, swiglu_limit)
        shared_width = cfg.moe_intermediate_size * cfg.num_shared_experts
        self.shared_experts = MLP.of(cfg, shared_width, swiglu_limit) if cfg.num_shared_experts else None
        self.post_mlp_norm = RMSNorm.of(cfg, cfg.hidden_size) if cfg.post_mlp_norm else None
        # Assignments per expert in the current optimizer step, and in the last finished one (statistics).
        self.register_buffer("load", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("last_load", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.kernel = reference  # replaced by Model.use_kernels
        self.expert_parallel = None  # set by kmodel.parallel.expert_parallel.attach_expert_parallel
        # (counts, tokens) -> the same summed over other ranks, set by the parallel engine: for aux_loss_kind
        # global over the data-parallel ranks, for every kind over a sequence's context-parallel ranks (None in
        # one process, where global is the micro-batch)
        self.global_counts = None

    def forward(self, x: torch.Tensor, token_mask: TokenMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, auxiliary loss already weighted by its coefficients). token_mask: the positions the
        statistics count (None: every token)."""
        cfg = self.cfg
        batch, seq, hidden = x.shape
        tokens = x.reshape(-1, hidden)
        logits = self.gate(tokens)
        use_bias = cfg.router == "sigmoid" and cfg.router_bias_update_rate > 0
        routing = self.kernel.route(
            logits,
            self.gate.e_score_correction_bias if use_bias else None,
            top_k=cfg.num_experts_per_tok,
            score_func=cfg.router,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        counted = None if token_mask is None else token_mask.valid.expand(batch, seq).reshape(-1)
        if self.training:
            self.load += self.counted_load(routing, counted)
        if self.expert_parallel is None:
            out = self.experts(tokens, routing, self.kernel)
        else:  # experts sharded over ranks: kmodel.parallel.expert_parallel exchanges the tokens
            out = self.expert_parallel.moe_experts(tokens, routing.experts, routing.weights, self.experts, self.kernel)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        if self.post_mlp_norm is not None:
            out = self.post_mlp_norm(out)
        aux = self.aux_loss(logits, routing, batch, None if token_mask is None else (counted, token_mask.row_tokens))
        return out.view(batch, seq, hidden), aux

    def counted_load(self, routing: reference.Routing, counted: torch.Tensor | None) -> torch.Tensor:
        """Assignments per expert of the counted tokens (`counted`: a mask over the flattened tokens; None: all)."""
        if counted is None:
            return routing.tokens_per_expert.detach().float()
        return torch.bincount(routing.experts[counted].flatten(), minlength=self.cfg.num_experts).float()

    def aux_loss(self, logits: torch.Tensor, routing: reference.Routing, batch: int,
                 counted: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """counted: (mask over the flattened tokens, row_tokens) of a `TokenMask`, or None: every token counts."""
        cfg = self.cfg
        loss = logits.new_zeros(())
        if not self.training:
            return loss
        if cfg.aux_loss_coef > 0:
            # Switch/DeepSeek balance loss: E/k * sum_i f_i * P_i per sequence (or over the whole batch; global:
            # f_i over every data-parallel rank's micro-batch, so the ranks' mean is the loss of their union).
            groups = batch if cfg.aux_loss_kind == "sequence" else 1
            e, k = cfg.num_experts, cfg.num_experts_per_tok
            probs = routing.scores / routing.scores.sum(dim=-1, keepdim=True)
            probs = probs.view(groups, -1, e)
            chosen = F.one_hot(routing.experts, e).sum(dim=1).float().view(groups, -1, e)
            if counted is None:
                counts, tokens = chosen.sum(dim=1), chosen.shape[1]
                mean_probs = probs.mean(dim=1)
            else:  # sums over the counted tokens; means over this part's share of the rows' counted tokens
                weight = counted[0].view(groups, -1, 1)
                tokens = counted[1] * (batch // groups)
                counts = (chosen * weight).sum(dim=1)
                mean_probs = (probs * weight).sum(dim=1) / tokens
            if self.global_counts is not None:
                counts, tokens = self.global_counts(counts, tokens)
            frac = counts / tokens * (e / k)
            loss = loss + cfg.aux_loss_coef * (frac * mean_probs).sum(dim=-1).mean()
        if cfg.router_z_loss_coef > 0:
            squares = torch.logsumexp(logits, dim=-1).pow(2)
            if counted is None:
                loss = loss + cfg.router_z_loss_coef * squares.mean()
            else:
                loss = loss + cfg.router_z_loss_coef * squares[counted[0]].sum() / (counted[1] * batch)
        return loss

    @torch.no_grad()
    def end_step(self) -> None:
        """Close an optimizer step: the aux-loss-free bias step (raise the bias of under-loaded experts,
        lower it for over-loaded ones), then keep the step's load for statistics and start counting anew.
        Under data parallelism `load` must be all-reduced before this so every rank keeps the same bias."""
        if self.cfg.router == "sigmoid" and self.cfg.router_bias_update_rate > 0 and self.load.sum() > 0:
            error = self.load.mean() - self.load
            self.gate.e_score_correction_bias += self.cfg.router_bias_update_rate * error.sign()
        self.last_load.copy_(self.load)
        self.load.zero_()
