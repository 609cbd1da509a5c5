"""Grouped-query self-attention with per-layer sliding window, optional QK-norm and RoPE/NoPE, and gpt-oss's
projection biases and attention sinks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kmodel.config import ModelConfig
from kmodel.kernels.attention import reference
from kmodel.model.norm import RMSNorm
from kmodel.model.rope import apply_rope, yarn_softmax_scale


@dataclass
class LayerCache:
    """Keys and values kept for generation. Sliding layers keep only the last `window - 1` positions,
    all a future query can still see; full layers keep everything. Latent-attention layers (mla.py) keep
    their compressed form instead: `keys` holds the normalised KV latent (batch, kept, kv_lora_rank) and
    `values` the shared rotated key (batch, kept, qk_rope_head_dim)."""

    keys: torch.Tensor | None = None  # (batch, kept, kv_heads, head_dim)
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # (kept,) absolute positions of the kept keys

    def extend(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        if self.keys is not None:
            keys = torch.cat((self.keys, keys), dim=1)
            values = torch.cat((self.values, values), dim=1)
            positions = torch.cat((self.positions, positions))
        self.keys, self.values, self.positions = keys, values, positions
        return keys, values, positions

    def trim(self, window: int | None) -> None:
        if window is not None:
            start = max(0, self.keys.shape[1] - (window - 1))
            self.keys, self.values, self.positions = self.keys[:, start:], self.values[:, start:], self.positions[start:]


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, *, scale: float, window: int | None,
               cu_seqlens: torch.Tensor | None, block: int = 256) -> torch.Tensor:
    """(q_heads,) largest pre-softmax logit scale * q.k over the pairs the attention lets through (causal,
    window, documents): MuonClip's per-head statistic. Query blocks bound the memory to block x seq."""
    batch, seq, heads, _ = q.shape
    k = k.repeat_interleave(heads // k.shape[2], dim=2)
    positions = torch.arange(seq, device=q.device)
    doc = None if cu_seqlens is None else reference.document_ids(cu_seqlens, batch, seq)
    best = torch.full((heads,), -torch.inf, device=q.device)
    for start in range(0, seq, block):
        rows = slice(start, min(start + block, seq))
        logits = torch.einsum("bqhd,bkhd->bhqk", q[:, rows].float(), k.float()) * scale
        visible = reference.visibility_mask(positions[rows], positions, window=window, causal=True).expand(batch, 1, -1, -1)
        if doc is not None:
            visible = visible & (doc[:, None, rows, None] == doc[:, None, None, :])
        best = torch.maximum(best, logits.masked_fill(~visible, -torch.inf).amax(dim=(0, 2, 3)))
    return best


class Attention(nn.Module):
    # (heads,) running maximum of the training forwards' logits, tracked only while set (MuonClip sets it).
    max_logits: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        base_scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else self.head_dim**-0.5
        self.scale = base_scale * yarn_softmax_scale(cfg.rope_scaling)
        sliding = cfg.layer_types[layer_idx] == "sliding_attention"
        self.window = cfg.window_of(layer_idx)
        self.use_rope = cfg.rope_layers == "all" or sliding
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if cfg.attention_sinks else None
        if cfg.qk_norm:
            self.q_norm = RMSNorm.of(cfg, self.head_dim)
            self.k_norm = RMSNorm.of(cfg, self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.kernel = reference  # replaced by Model.use_kernels

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.max_logits is not None and self.training and cache is None:
            seen = max_logits(q, k, scale=self.scale, window=self.window, cu_seqlens=cu_seqlens)
            self.max_logits = torch.maximum(self.max_logits.to(seen.device), seen)

        if cache is None or cache.keys is None:
            out = self.kernel.attention(
                q, k, v, window=self.window, scale=self.scale, cu_seqlens=cu_seqlens, sinks=self.sinks
            )
            if cache is not None:
                cache.extend(k, v, positions)
        else:
            # New queries against the cache, through the kernel seam (the cache's positions are consecutive).
            keys, values, _ = cache.extend(k, v, positions)
            lens = torch.full((batch,), keys.shape[1], device=q.device)
            out = self.kernel.decode_attention(
                q, keys, values, cache_lens=lens, window=self.window, scale=self.scale, sinks=self.sinks
            )
        if cache is not None:
            cache.trim(self.window)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))
