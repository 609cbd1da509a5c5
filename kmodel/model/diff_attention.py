"""Grouped differential attention (Motif-2; arXiv 2510.06949, building on the Differential Transformer,
arXiv 2410.05258).

Every output head takes the difference of two softmax maps over the same values,
    (softmax(Q1 K1^T s) - lambda * softmax(Q2 K2^T s)) V,
normalises it (RMSNorm over its 2 * head_dim channels, one weight shared by the heads) and scales it by
(1 - lambda_init). The query heads come in groups of `grouped_ratio` signal heads plus one noise head; the
group's noise map is subtracted from each of its signal heads, so fewer heads control noise than carry
signal. Keys come in pairs (signal key, noise key) and values in pairs (v1, v2) concatenated to one
2 * head_dim value per key pair; query heads share key pairs as in GQA. Head layout (as Motif's checkpoints):
q = [g0: signal x grouped_ratio, noise | g1: ...], k = [pair 0: signal, noise | pair 1: ...], v likewise.

    lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init,
    lambda_init = 0.8 - 0.6 exp(-0.3 (layer_idx - 1))      (layer_idx from 0, as Motif's code counts it)

The two maps use different keys, so they cannot share one pass over K; each goes through the attention
kernel (reference or Triton) once, with the 2 * head_dim values both maps share.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kmodel.config import ModelConfig
from kmodel.kernels.attention import reference
from kmodel.model.attention import LayerCache
from kmodel.model.norm import RMSNorm
from kmodel.model.rope import apply_rope, yarn_softmax_scale


def lambda_init_of(layer_idx: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * (layer_idx - 1))


class DifferentialAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d = self.head_dim = cfg.head_dim
        self.noise_heads = cfg.num_noise_heads
        self.signal_heads = cfg.num_attention_heads - cfg.num_noise_heads
        self.grouped_ratio = self.signal_heads // self.noise_heads
        self.key_pairs = cfg.num_key_value_heads // 2
        base_scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else d**-0.5
        self.scale = base_scale * yarn_softmax_scale(cfg.rope_scaling)
        self.window = cfg.window_of(layer_idx)
        self.use_rope = cfg.rope_layers == "all" or cfg.layer_types[layer_idx] == "sliding_attention"
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(self.signal_heads * 2 * d, h, bias=False)
        self.lambda_q1 = nn.Parameter(torch.empty(d))
        self.lambda_k1 = nn.Parameter(torch.empty(d))
        self.lambda_q2 = nn.Parameter(torch.empty(d))
        self.lambda_k2 = nn.Parameter(torch.empty(d))
        self.lambda_init = lambda_init_of(layer_idx)
        self.subln = RMSNorm(2 * d, cfg.attn_rms_norm_eps)
        self.kernel = reference  # replaced by Model.use_kernels

    def lambda_full(self) -> torch.Tensor:
        dtype = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        first = torch.exp((self.lambda_q1.to(dtype) * self.lambda_k1.to(dtype)).sum())
        second = torch.exp((self.lambda_q2.to(dtype) * self.lambda_k2.to(dtype)).sum())
        return first - second + self.lambda_init

    def split(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """(signal queries, noise queries, signal keys, noise keys, 2 * head_dim values) from the projections."""
        batch, seq = q.shape[:2]
        groups = q.view(batch, seq, self.noise_heads, self.grouped_ratio + 1, self.head_dim)
        q1 = groups[:, :, :, :-1].reshape(batch, seq, self.signal_heads, self.head_dim)
        q2 = groups[:, :, :, -1]
        pairs = k.view(batch, k.shape[1], self.key_pairs, 2, self.head_dim)
        values = v.view(batch, v.shape[1], self.key_pairs, 2 * self.head_dim)
        return q1, q2, pairs[:, :, :, 0], pairs[:, :, :, 1], values

    def combine(self, signal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """signal (batch, seq, signal heads, 2d), noise (batch, seq, noise heads, 2d) -> o_proj input."""
        batch, seq = signal.shape[:2]
        noise = noise.repeat_interleave(self.grouped_ratio, dim=2)  # each group's noise under its signal heads
        out = signal - self.lambda_full().to(signal.dtype) * noise
        out = self.subln(out) * (1.0 - self.lambda_init)
        return out.reshape(batch, seq, self.signal_heads * 2 * self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim)
        v = self.v_proj(x)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        if cache is None or cache.keys is None:
            q1, q2, k1, k2, values = self.split(q, k, v)
            maps = [
                self.kernel.attention(queries, keys, values, window=self.window, scale=self.scale, cu_seqlens=cu_seqlens)
                for queries, keys in ((q1, k1), (q2, k2))
            ]
            if cache is not None:
                cache.extend(k, v.view(batch, seq, -1, self.head_dim), positions)
        else:
            keys, values, _ = cache.extend(k, v.view(batch, seq, -1, self.head_dim), positions)
            q1, q2, k1, k2, values = self.split(q, keys, values.reshape(batch, keys.shape[1], -1))
            lens = torch.full((batch,), keys.shape[1], device=q.device)
            maps = [
                self.kernel.decode_attention(queries, keys, values, cache_lens=lens, window=self.window, scale=self.scale)
                for queries, keys in ((q1, k1), (q2, k2))
            ]
        if cache is not None:
            cache.trim(self.window)
        return self.o_proj(self.combine(*maps))
