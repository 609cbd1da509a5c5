"""The decoder: embedding -> layers (attention + dense MLP or MoE) -> final norm -> LM head (+ MTP).

Parameter names mirror Hugging Face's where one exists (embed_tokens, layers.N.self_attn.q_proj, ...,
mlp.gate, mlp.experts.gate_up_proj, mlp.shared_experts), so the export is a short, explicit table.
Norm names say where the norm sits: `attn_in_norm` before attention, `attn_out_norm` on its output,
likewise `mlp_in_norm` / `mlp_out_norm`; which exist depends on `norm_placement`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from kmodel import kernels
from kmodel.config import Config, KernelsConfig, ModelConfig
from kmodel.kernels.loss import reference as loss_reference
from kmodel.model.attention import Attention, LayerCache
from kmodel.model.diff_attention import DifferentialAttention
from kmodel.model.diff_latent_attention import DifferentialLatentAttention
from kmodel.model.hyper_connections import HyperConnection
from kmodel.model.init import init_parameters
from kmodel.model.mla import LatentAttention
from kmodel.model.moe import MLP, MoE, TokenMask
from kmodel.model.norm import RMSNorm
from kmodel.model.rope import rope_cos_sin


class ModelOutput(NamedTuple):  # a NamedTuple so ZeRO-3's hooks can find the tensors in it
    logits: torch.Tensor | None  # (batch, seq, vocab); None when only the loss was asked for
    loss: torch.Tensor | None = None  # total: lm + mtp + aux + logits z-loss, each weighted
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE balance + router z-loss, weighted
    z_loss: torch.Tensor | None = None  # output-logits z-loss, unweighted
    mtp_depth_losses: tuple[torch.Tensor, ...] | None = None  # each depth's cross-entropy; mtp_loss is their mean


class Rows(NamedTuple):
    """The whole rows a forward's positions were cut from (context parallelism: a rank holds some positions of
    each row, its `position_ids`). Multi-token prediction reads tokens and labels ahead of the positions held."""

    input_ids: torch.Tensor  # (batch, row length)
    labels: torch.Tensor
    segment_ids: torch.Tensor | None = None


ATTENTION_KINDS = {
    "gqa": Attention,
    "mla": LatentAttention,
    "differential": DifferentialAttention,
    "differential_latent": DifferentialLatentAttention,
}


class DecoderLayer(nn.Module):
    """Attention and feed-forward of layer `layer_idx` (its window, RoPE, SwiGLU clamp); `sparse` overrides
    the layer's feed-forward kind (the MTP blocks' mtp_mlp_type). With hc_mult > 1 the layer reads and writes
    hc_mult residual streams (batch, seq, hc_mult, hidden) through one hyper-connection per sublayer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, sparse: bool | None = None):
        super().__init__()
        self.self_attn = ATTENTION_KINDS[cfg.attention_kind](cfg, layer_idx)
        self.residual_multiplier = cfg.residual_multiplier
        sparse = cfg.mlp_layer_types[layer_idx] == "sparse" if sparse is None else sparse
        limit = cfg.swiglu_limit_of(layer_idx)
        self.mlp = MoE(cfg, limit) if sparse else MLP.of(cfg, cfg.intermediate_size, limit)
        placement = cfg.norm_placement

        def norm_if(wanted: bool) -> RMSNorm | None:
            return RMSNorm.of(cfg, cfg.hidden_size) if wanted else None

        self.attn_in_norm = norm_if(placement in ("pre", "sandwich"))
        self.attn_out_norm = norm_if(placement in ("post", "sandwich"))
        self.mlp_in_norm = norm_if(placement in ("pre", "sandwich"))
        self.mlp_out_norm = norm_if(placement in ("post", "sandwich"))
        self.attn_hc = HyperConnection(cfg) if cfg.hc_mult > 1 else None
        self.mlp_hc = HyperConnection(cfg) if cfg.hc_mult > 1 else None

    @staticmethod
    def _maybe(norm: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else norm(x)

    def attention_branch(self, x, rope, positions, cu_seqlens=None, cache=None) -> torch.Tensor:
        h = self.self_attn(self._maybe(self.attn_in_norm, x), rope, positions, cu_seqlens, cache)
        return self.residual_multiplier * self._maybe(self.attn_out_norm, h)

    def mlp_branch(self, x: torch.Tensor, token_mask: TokenMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._maybe(self.mlp_in_norm, x)
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(h, token_mask)
        else:
            h, aux = self.mlp(h), x.new_zeros(())
        return self.residual_multiplier * self._maybe(self.mlp_out_norm, h), aux

    def forward(self, x, rope, positions, cu_seqlens=None, cache=None, token_mask: TokenMask | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """token_mask: the positions the MoE statistics count (None: all)."""
        if self.attn_hc is None:
            x = x + self.attention_branch(x, rope, positions, cu_seqlens, cache)
            h, aux = self.mlp_branch(x, token_mask)
            return x + h, aux
        inner, maps = self.attn_hc.pre(x)
        x = self.attn_hc.post(x, self.attention_branch(inner, rope, positions, cu_seqlens, cache), maps)
        inner, maps = self.mlp_hc.pre(x)
        h, aux = self.mlp_branch(inner, token_mask)
        return self.mlp_hc.post(x, h, maps), aux


class MultiTokenPrediction(nn.Module):
    """One depth of DeepSeek-V3-style multi-token prediction. Depth k at position i fuses the previous depth's
    hidden state at i (the main model's for k = 1) with the embedding of token i + k, runs one decoder layer and
    predicts token i + k + 1 through the shared LM head. The projection's input is [embedding; hidden], the
    order of DeepSeek-V3's and K-EXAONE's released MTP weights. The un-normalised output feeds depth k + 1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm.of(cfg, cfg.hidden_size)
        self.hnorm = RMSNorm.of(cfg, cfg.hidden_size)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, cfg.num_hidden_layers - 1, sparse=cfg.mtp_mlp_type == "sparse")
        self.norm = RMSNorm.of(cfg, cfg.hidden_size)

    def forward(self, hidden, embeds, rope, positions, cu_seqlens=None, cache=None, token_mask=None):
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(hidden)), dim=-1))
        return self.block(x, rope, positions, cu_seqlens, cache, token_mask)


def mtp_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None, depth: int) -> torch.Tensor:
    """MTP depth k's target at every position i (batch, seq): labels[:, i + k] (token i + k + 1), ignored (-100)
    where i + k is past the row or token i + k + 1 lies in another document than i (not predictable from i)."""
    seq = labels.shape[1]
    targets = torch.full_like(labels, -100)
    n = seq - depth
    if n < 1:
        return targets
    targets[:, :n] = labels[:, depth:]
    if segment_ids is not None:
        crosses = segment_ids[:, depth + 1 :] != segment_ids[:, : n - 1]
        targets[:, : n - 1][crosses] = -100
    return targets


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
        depth = cfg.num_nextn_predict_layers
        self.mtp = nn.ModuleList(MultiTokenPrediction(cfg) for _ in range(depth)) if depth else None
        self.loss_kernel = loss_reference

    # --- kernels seam ---------------------------------------------------------------------------
    def use_kernels(self, choice: KernelsConfig, device: torch.device | str) -> None:
        """Point every module at the implementation the recipe's `kernels:` section picks."""
        impl = {op: kernels.resolve(getattr(choice, op), device) for op in kernels.OPS}
        for op, feature in self.unsupported_by_triton().items():
            if impl[op] == "triton":
                if getattr(choice, op) == "triton":
                    raise ValueError(f"kernels.{op}: triton does not implement {feature}; set kernels.{op}: torch")
                impl[op] = "torch"  # auto: the reference implements it
        pick = {op: kernels.load(op, impl[op]) for op in kernels.OPS}
        for module in self.modules():
            if isinstance(module, tuple(ATTENTION_KINDS.values())):
                module.kernel = pick["attention"]
            elif isinstance(module, MoE):
                module.kernel = pick["moe"]
            elif isinstance(module, RMSNorm):
                module.kernel = pick["norm"]
        self.loss_kernel = pick["loss"]

    def unsupported_by_triton(self) -> dict[str, str]:
        """Ops whose Triton kernel lacks a feature this config uses -> the feature, by its config name."""
        missing = {}
        if self.cfg.swiglu_limits is not None and any(self.cfg.swiglu_limits):
            missing["moe"] = "the per-layer SwiGLU clamps (swiglu_limits)"
        if self.cfg.mlp_activation == "polynorm" and "sparse" in self.cfg.mlp_layer_types:
            missing["moe"] = "PolyNorm routed experts (mlp_activation 'polynorm', Motif-3's grouped PolyNorm)"
        return missing

    # --- forward --------------------------------------------------------------------------------
    def rope_tables(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin per layer type: full layers use rope_theta (and rope_scaling); sliding layers use the
        unscaled rope_local_base_freq when it is set, else the same table. fp64 for an fp64 model."""
        cfg = self.cfg
        # the weights' dtype (any parameter: a pipeline stage may hold no embedding)
        dtype = torch.promote_types(next(self.parameters()).dtype, torch.float32)
        full = rope_cos_sin(positions, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, dtype)
        if cfg.rope_local_base_freq is None:
            return {"full_attention": full, "sliding_attention": full}
        local = rope_cos_sin(positions, cfg.rope_dim, cfg.rope_local_base_freq, dtype=dtype)
        return {"full_attention": full, "sliding_attention": local}

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.cfg.embedding_multiplier

    def backbone(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scaled input embeddings, last hidden state before the final norm, summed MoE aux loss)."""
        embeds, x = self.embed_streams(input_ids)
        x, aux = self.run_layers(x, range(len(self.layers)), position_ids, cu_seqlens=cu_seqlens, cache=cache)
        return embeds, self.last_hidden(x), aux

    # The backbone in pieces, so a pipeline stage (kmodel.parallel.pipeline) runs only the layers it holds.
    def embed_streams(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled input embeddings, the residual stream they start: hc_mult copies under hyper-connections)."""
        embeds = self.embed(input_ids)
        streams = self.cfg.hc_mult
        x = embeds if streams == 1 else embeds.unsqueeze(-2).expand(*embeds.shape[:-1], streams, embeds.shape[-1])
        return embeds, x

    def run_layers(
        self,
        x: torch.Tensor,
        layers: range,
        position_ids: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        aux: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layers `layers` (global indices) on the residual stream: (stream, `aux` plus their MoE aux loss)."""
        ropes = self.rope_tables(position_ids)
        aux = x.new_zeros((), dtype=torch.float32) if aux is None else aux
        for i in layers:
            rope = ropes[self.cfg.layer_types[i]]
            x, layer_aux = self.layers[i](x, rope, position_ids, cu_seqlens, None if cache is None else cache[i])
            aux = aux + layer_aux
        return x, aux

    def last_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden state after the last layer: the stream, or the streams' mean under hyper-connections (Motif-3)."""
        return x if self.cfg.hc_mult == 1 else x.mean(dim=-2)

    def head_input(self, hidden: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """What the shared LM head multiplies: the normalised hidden state times logits_scaling (the muP
        output multiplier, which so reaches the fused loss too)."""
        return norm(hidden) * self.cfg.logits_scaling

    def logits(self, hidden: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """Logits (fp32 at least) from a hidden state before its norm: the final norm's, or an MTP depth's."""
        x = self.head_input(hidden, self.norm if norm is None else norm)
        return (x @ self.head_weight.t()).to(torch.promote_types(x.dtype, torch.float32))

    def mtp_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP blocks copy the last layer, so they rotate with its layer type's table."""
        return self.rope_tables(positions)[self.cfg.layer_types[-1]]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        return_logits: bool | None = None,
        rows: Rows | None = None,
    ) -> ModelOutput:
        """input_ids (batch, seq). labels (batch, seq): the target of each position (already shifted),
        -100 to ignore. segment_ids (batch, seq): document index per token for document masking.
        position_ids (seq,): absolute positions (generation with a cache); default 0..seq-1.
        rows: the whole rows when this forward holds only the positions `position_ids` of them (context
        parallelism; attention then takes its document mask from its kernel seam): MTP reads ahead in them."""
        seq = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)
        cu_seqlens = None if segment_ids is None else cu_seqlens_from_segments(segment_ids)
        embeds, hidden, aux = self.backbone(input_ids, position_ids, cu_seqlens=cu_seqlens, cache=cache)

        want_logits = labels is None if return_logits is None else return_logits
        logits = self.logits(hidden) if want_logits else None
        if labels is None:
            return ModelOutput(logits=logits)
        return self.losses(hidden, embeds, aux, labels, position_ids, segment_ids, logits, rows)

    def losses(
        self,
        hidden: torch.Tensor,
        embeds: torch.Tensor,
        aux: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        rows: Rows | None = None,
    ) -> ModelOutput:
        """The loss and its terms from the last hidden state (before the final norm), the input embeddings (for
        MTP) and the layers' summed MoE aux loss: LM cross-entropy + aux + logits z-loss (+ the MTP depths)."""
        cfg = self.cfg
        lm_loss, z_loss = self.loss_kernel.linear_cross_entropy(
            self.head_input(hidden, self.norm).reshape(-1, cfg.hidden_size), self.head_weight, labels.reshape(-1)
        )
        loss = lm_loss + aux + cfg.logits_z_loss_coef * z_loss
        mtp_loss = losses = None
        if self.mtp is not None:
            losses, mtp_aux = self.mtp_losses(hidden, embeds, labels, position_ids, segment_ids, rows)
            if losses:
                mtp_loss = torch.stack(losses).mean()
                loss = loss + sum(w * l for w, l in zip(cfg.mtp_depth_weights, losses)) + mtp_aux
                aux = aux + mtp_aux
        return ModelOutput(logits, loss, lm_loss, mtp_loss, aux, z_loss, tuple(losses) if losses else None)

    def mtp_losses(
        self,
        hidden: torch.Tensor,
        embeds: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        rows: Rows | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Cross-entropy of each MTP depth (depth k: position i predicts labels[:, i + k], the token i + k + 1),
        and the depths' summed MoE aux loss. Depths with no position left in the sequence are skipped.

        Whole rows: depth k drops the last k positions. A part of the rows (`rows` given): every position held
        stays (the parts keep their shapes) and reads token i + k from the rows; those with i + k past the row
        are left out of the loss (ignored targets) and of the MoE statistics (`TokenMask`). Being the last
        positions, causal attention never reads them, so the parts together compute what the whole rows do."""
        cfg = self.cfg
        seq = hidden.shape[1]
        row_len = seq if rows is None else rows.input_ids.shape[1]
        cos, sin = self.mtp_rope(positions)
        losses, aux = [], hidden.new_zeros((), dtype=torch.float32)
        h = hidden
        for k, depth in enumerate(self.mtp, start=1):
            n = row_len - k  # positions whose token i + k is in the row
            if n < 1:
                break
            if rows is None:
                segments = None if segment_ids is None else segment_ids[:, :n]
                cu_seqlens = None if segments is None else cu_seqlens_from_segments(segments)
                h, depth_aux = depth(h[:, :n], embeds[:, k:], (cos[:n], sin[:n]), positions[:n], cu_seqlens)
                targets = mtp_targets(labels, segment_ids, k)[:, :n]
            else:
                ahead = rows.input_ids[:, (positions + k).clamp(max=row_len - 1)]  # past the row: masked below
                counted = TokenMask(positions + k < row_len, row_tokens=n * seq / row_len)
                h, depth_aux = depth(h, self.embed(ahead), (cos, sin), positions, token_mask=counted)
                targets = mtp_targets(rows.labels, rows.segment_ids, k)[:, positions]
            loss, _ = self.loss_kernel.linear_cross_entropy(
                self.head_input(h, depth.norm).reshape(-1, cfg.hidden_size), self.head_weight, targets.reshape(-1)
            )
            losses.append(loss)
            aux = aux + depth_aux
        return losses, aux

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
    cfg: Config,
    device: torch.device | str = "cpu",
    *,
    init: bool = True,
    experts: tuple[int, int] | None = None,
    keep: Callable[[Model], None] | None = None,
) -> Model:
    """The model for a recipe, on `device`, with kernels picked by `cfg.kernels` and weights drawn from `cfg.seed`
    (`init=False`: left for a checkpoint to fill). `experts` = (first, count) keeps only those routed experts
    of every MoE layer (expert parallelism); `keep` drops modules from the meta model (a pipeline stage keeps
    its layers). Built on the meta device first, so nothing beyond what is kept is ever allocated."""
    with torch.device("meta"):
        model = Model(cfg.model)
    if keep is not None:
        keep(model)
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
