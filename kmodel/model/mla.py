"""Multi-head latent attention (MLA, DeepSeek-V2/V3, A.X K1).

Keys and values are compressed into one low-rank latent per token (`kv_a_proj_with_mqa` -> RMSNorm), from
which `kv_b_proj` expands every head's no-RoPE key part and its value. Positions enter through a separate
`qk_rope_head_dim`-wide key, rotated once and shared by all heads (the "decoupled RoPE key"). The query is
optionally low-rank too (`q_a_proj` -> RMSNorm -> `q_b_proj`). Each head's query/key is [no-RoPE | RoPE].

The generation cache stores only the normalised latent and the rotated shared key — kv_lora_rank +
qk_rope_head_dim numbers per position instead of 2 * heads * head_dim — and re-expands them on use.
Parameter names are Hugging Face's DeepSeek-V3 names, so the export is a prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from kmodel.config import ModelConfig
from kmodel.kernels.attention import reference
from kmodel.model.attention import LayerCache, max_logits
from kmodel.model.norm import RMSNorm
from kmodel.model.rope import apply_rope, yarn_softmax_scale


class LatentAttention(nn.Module):
    max_logits: torch.Tensor | None = None  # (heads,) tracked only while set (MuonClip), as in Attention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_head_dim = self.nope_dim + self.rope_dim
        sliding = cfg.layer_types[layer_idx] == "sliding_attention"
        self.window = cfg.window_of(layer_idx)
        self.use_rope = cfg.rope_layers == "all" or sliding
        base_scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else qk_head_dim**-0.5
        self.scale = base_scale * yarn_softmax_scale(cfg.rope_scaling)
        h = cfg.hidden_size
        self.low_rank_query = cfg.q_lora_rank is not None
        if not self.low_rank_query:
            self.q_proj = nn.Linear(h, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm.of(cfg, cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm.of(cfg, self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=False)
        self.kernel = reference  # replaced by Model.use_kernels

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_rank_query:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def expand(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys (batch, seq, heads, nope + rope) and values (batch, seq, heads, v) from the latent
        (batch, seq, kv_lora_rank) and the shared rotated key (batch, seq, rope)."""
        batch, seq, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch, seq, self.num_heads, self.nope_dim + self.v_dim)
        key_nope, values = kv.split((self.nope_dim, self.v_dim), dim=-1)
        shared = rope_key[:, :, None, :].expand(batch, seq, self.num_heads, self.rope_dim)
        return torch.cat((key_nope, shared), dim=-1), values

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.query(x).view(batch, seq, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split((self.nope_dim, self.rope_dim), dim=-1)
        latent, rope_key = self.kv_a_proj_with_mqa(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        latent = self.kv_a_layernorm(latent)
        if self.use_rope:
            q_rope = apply_rope(q_rope, *rope)
            rope_key = apply_rope(rope_key[:, :, None, :], *rope)[:, :, 0, :]
        q = torch.cat((q_nope, q_rope), dim=-1)

        if cache is None and hasattr(self.kernel, "latent_attention"):
            # a seam that moves the latent rather than every head's keys (context parallelism; no MuonClip there)
            out = self.kernel.latent_attention(q, latent, rope_key, self.expand, window=self.window, scale=self.scale,
                                               cu_seqlens=cu_seqlens)
        elif cache is None or cache.keys is None:
            keys, values = self.expand(latent, rope_key)
            if self.max_logits is not None and self.training and cache is None:
                seen = max_logits(q, keys, scale=self.scale, window=self.window, cu_seqlens=cu_seqlens)
                self.max_logits = torch.maximum(self.max_logits.to(seen.device), seen)
            out = self.kernel.attention(q, keys, values, window=self.window, scale=self.scale, cu_seqlens=cu_seqlens)
            if cache is not None:
                cache.extend(latent, rope_key, positions)
        else:
            # The cache holds latents: expand the kept positions (and the new ones) to keys and values.
            latents, rope_keys, _ = cache.extend(latent, rope_key, positions)
            keys, values = self.expand(latents, rope_keys)
            lens = torch.full((batch,), keys.shape[1], device=q.device)
            out = self.kernel.decode_attention(q, keys, values, cache_lens=lens, window=self.window, scale=self.scale)
        if cache is not None:
            cache.trim(self.window)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.v_dim))
