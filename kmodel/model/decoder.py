"""The decoder: embedding -> layers (attention + dense MLP or MoE) -> final norm -> LM head (+ MTP).

Parameter names mirror Hugging Face's where one exists (embed_tokens, layers.N.self_attn.q_proj, ...,
mlp.gate, mlp.experts.gate_up_proj, mlp.shared_experts), so the export is a short, explicit table.
Norm names say where the norm sits: `attn_in_norm` before attention, `attn_out_norm` on its output,
likewise `mlp_in_norm` / `mlp_out_norm`; which exist depends on `norm_placement`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kmodel import kernels
from kmodel.config import Config, KernelsConfig, ModelConfig
from kmodel.kernels.loss import reference as loss_reference
from kmodel.model.attention import Attention, LayerCache
from kmodel.model.init import init_parameters
from kmodel.model.mla import LatentAttention
from kmodel.model.moe import MLP, MoE
from kmodel.model.norm import RMSNorm
from kmodel.model.rope import rope_cos_sin


class ModelOutput(NamedTuple):  # a NamedTuple so ZeRO-3's hooks can find the tensors in it
    logits: torch.Tensor | None  # (batch, seq, vocab); None when only the loss was asked for
    loss: torch.Tensor | None = None  # total: lm + mtp + aux + logits z-loss, each weighted
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE balance + router z-loss, weighted
    z_loss: torch.Tensor | None = None  # output-logits z-loss, unweighted


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LatentAttention(cfg, layer_idx) if cfg.attention_kind == "mla" else Attention(cfg, layer_idx)
        self.residual_multiplier = cfg.residual_multiplier
        sparse = cfg.mlp_layer_types[layer_idx] == "sparse"
        self.mlp = MoE(cfg) if sparse else MLP(cfg.hidden_size, cfg.intermediate_size)
        placement = cfg.norm_placement

        def norm_if(wanted: bool) -> RMSNorm | None:
            return RMSNorm.of(cfg, cfg.hidden_size) if wanted else None

        self.attn_in_norm = norm_if(placement in ("pre", "sandwich"))
        self.attn_out_norm = norm_if(placement in ("post", "sandwich"))
        self.mlp_in_norm = norm_if(placement in ("pre", "sandwich"))
        self.mlp_out_norm = norm_if(placement in ("post", "sandwich"))

    @staticmethod
    def _maybe(norm: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else norm(x)

    def forward(self, x, rope, positions, cu_seqlens=None, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.self_attn(self._maybe(self.attn_in_norm, x), rope, positions, cu_seqlens, cache)
        x = x + self.residual_multiplier * self._maybe(self.attn_out_norm, h)
        h = self._maybe(self.mlp_in_norm, x)
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(h)
        else:
            h, aux = self.mlp(h), x.new_zeros(())
        return x + self.residual_multiplier * self._maybe(self.mlp_out_norm, h), aux


class MultiTokenPrediction(nn.Module):
    """DeepSeek-V3-style MTP depth 1: position i combines the main model's hidden state with the
    embedding of token i+1 and predicts token i+2, sharing the embedding and LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm.of(cfg, cfg.hidden_size)
        self.hnorm = RMSNorm.of(cfg, cfg.hidden_size)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, cfg.num_hidden_layers - 1)
        self.norm = RMSNorm.of(cfg, cfg.hidden_size)

    def forward(self, hidden, next_embeds, rope, positions, cu_seqlens):
        x = self.eh_proj(torch.cat((self.hnorm(hidden), self.enorm(next_embeds)), dim=-1))
        x, aux = self.block(x, rope, positions, cu_seqlens)
        return self.norm(x), aux


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths over the flattened (batch * seq) tokens from per-token document ids;
    every batch row starts a new document."""
    batch, seq = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    boundaries = torch.nonzero(starts.flatten()).flatten()
    end = torch.tensor([batch * seq], device=segment_ids.device)
    return torch.cat((boundaries, end)).to(torch.int32)


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm.of(cfg, cfg.hidden_size)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = MultiTokenPrediction(cfg) if cfg.num_nextn_predict_layers else None
        self.loss_kernel = loss_reference

    # --- kernels seam ---------------------------------------------------------------------------
    def use_kernels(self, choice: KernelsConfig, device: torch.device | str) -> None:
        """Point every module at the implementation the recipe's `kernels:` section picks."""
        impl = {op: kernels.resolve(getattr(choice, op), device) for op in kernels.OPS}
        pick = {op: kernels.load(op, impl[op]) for op in kernels.OPS}
        for module in self.modules():
            if isinstance(module, (Attention, LatentAttention)):
                module.kernel = pick["attention"]
            elif isinstance(module, MoE):
                module.kernel = pick["moe"]
            elif isinstance(module, RMSNorm):
                module.kernel = pick["norm"]
        self.loss_kernel = pick["loss"]

    # --- forward --------------------------------------------------------------------------------
    def rope_tables(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin per layer type: full layers use rope_theta (and rope_scaling); sliding layers use the
        unscaled rope_local_base_freq when it is set, else the same table. fp64 for an fp64 model."""
        cfg = self.cfg
        dtype = torch.promote_types(self.embed_tokens.weight.dtype, torch.float32)
        full = rope_cos_sin(positions, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, dtype)
        if cfg.rope_local_base_freq is None:
            return {"full_attention": full, "sliding_attention": full}
        local = rope_cos_sin(positions, cfg.rope_dim, cfg.rope_local_base_freq, dtype=dtype)
        return {"full_attention": full, "sliding_attention": local}

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        return_logits: bool | None = None,
    ) -> ModelOutput:
        """input_ids (batch, seq). labels (batch, seq): the target of each position (already shifted),
        -100 to ignore. segment_ids (batch, seq): document index per token for document masking.
        position_ids (seq,): absolute positions (generation with a cache); default 0..seq-1."""
        cfg = self.cfg
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)
        ropes = self.rope_tables(position_ids)
        cu_seqlens = None if segment_ids is None else cu_seqlens_from_segments(segment_ids)

        embeds = self.embed_tokens(input_ids) * cfg.embedding_multiplier
        x = embeds
        aux = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            rope = ropes[cfg.layer_types[i]]
            x, layer_aux = layer(x, rope, position_ids, cu_seqlens, None if cache is None else cache[i])
            aux = aux + layer_aux
        hidden = x
        # Scaling the final hidden state scales the logits (muP output multiplier) and reaches the fused loss too.
        x = self.norm(x) * cfg.logits_scaling

        want_logits = labels is None if return_logits is None else return_logits
        logits = (x @ self.head_weight.t()).to(torch.promote_types(x.dtype, torch.float32)) if want_logits else None
        if labels is None:
            return ModelOutput(logits=logits)

        lm_loss, z_loss = self.loss_kernel.linear_cross_entropy(
            x.reshape(-1, cfg.hidden_size), self.head_weight, labels.reshape(-1)
        )
        loss = lm_loss + aux + cfg.logits_z_loss_coef * z_loss
        mtp_loss = None
        if self.mtp is not None and seq > 1:
            mtp_segments = None if segment_ids is None else segment_ids[:, :-1]
            mtp_hidden, mtp_aux = self.mtp(
                hidden[:, :-1],
                embeds[:, 1:],
                tuple(t[:-1] for t in ropes[cfg.layer_types[-1]]),
                position_ids[:-1],
                None if mtp_segments is None else cu_seqlens_from_segments(mtp_segments),
            )
            mtp_targets = labels[:, 1:]
            if segment_ids is not None:  # token i+2 in another document is not predictable from i
                crosses = segment_ids[:, 2:] != segment_ids[:, :-2]
                mtp_targets = mtp_targets.clone()
                mtp_targets[:, :-1][crosses] = -100
            mtp_loss, _ = self.loss_kernel.linear_cross_entropy(
                mtp_hidden.reshape(-1, cfg.hidden_size), self.head_weight, mtp_targets.reshape(-1)
            )
            aux = aux + mtp_aux
            loss = loss + cfg.mtp_loss_coef * mtp_loss + mtp_aux
        return ModelOutput(logits, loss, lm_loss, mtp_loss, aux, z_loss)

    # --- MoE balancing and statistics -------------------------------------------------------------
    def moe_layers(self) -> dict[str, MoE]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MoE)}

    def end_step(self) -> None:
        """Call once after every optimizer step: MoE bias updates and the step's router statistics."""
        for moe in self.moe_layers().values():
            moe.end_step()

    @torch.no_grad()
    def router_stats(self) -> dict[str, dict[str, float | list[float]]]:
        """Per MoE layer, for the last finished step: assignments per expert, max/mean load, dead experts."""
        stats = {}
        for name, moe in self.moe_layers().items():
            load = moe.last_load
            mean = load.mean().item()
            stats[name] = {
                "load": load.tolist(),
                "max_over_mean": load.max().item() / mean if mean > 0 else 0.0,
                "dead_experts": int((load == 0).sum().item()) if mean > 0 else 0,
            }
        return stats

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.layers]


def build_model(
    cfg: Config, device: torch.device | str = "cpu", *, init: bool = True, experts: tuple[int, int] | None = None
) -> Model:
    """The model for a recipe, on `device`, with kernels picked by `cfg.kernels` and weights drawn from `cfg.seed`
    (`init=False`: left for a checkpoint to fill). `experts` = (first, count) keeps only those routed experts
    of every MoE layer (expert parallelism). Built on the meta device first, so nothing beyond what is kept
    is ever allocated."""
    with torch.device("meta"):
        model = Model(cfg.model)
    if experts is not None:
        for moe in model.moe_layers().values():
            moe.experts.keep_experts(*experts)
    model.to_empty(device=device)
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.zero_()  # router correction biases and load counters start at zero
    if init:
        init_parameters(model, cfg.seed, cfg.model.initializer_range)
    model.use_kernels(cfg.kernels, device)
    return model
