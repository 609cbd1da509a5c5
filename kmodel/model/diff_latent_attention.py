"""Differential latent attention (Motif-3): Motif-2's grouped differential attention (kmodel/model/diff_attention.py,
arXiv 2510.06949) with its keys and values expanded from MLA's low-rank latent (kmodel/model/mla.py), a
data-dependent lambda and an optional output gate.

Heads are laid out as in Motif-2: query heads in groups of `grouped_ratio` signal heads + 1 noise head, keys in
(signal, noise) pairs, the pair's two values concatenated to 2 * v_head_dim; query heads share key pairs as in
GQA. Each query is [no-RoPE | RoPE] (full-rank or low-rank projection); kv_b_proj expands the one normalised
latent into every key head's no-RoPE part and value; the decoupled RoPE key is shared by all keys, as in MLA.
Per token t and signal head h:

    lambda = sigmoid(x_t . w_lambda_h)                                         (lambda_proj: hidden -> signal heads)
    o      = RMSNorm((softmax(q1 k1^T s) - lambda softmax(q2 k2^T s)) V)          over 2 * v_head_dim, one weight
    o      = o * sigmoid(x_t W_gate_h)                                          (attention_output_gate only)
    out    = o_proj([o_1 | ... | o_signal])

Unlike Motif-2's lambda (a per-layer scalar built from four vectors and lambda_init) this lambda depends on the
token and lies in (0, 1), so the output is not rescaled by (1 - lambda_init). Assumed where Motif-3's modeling
code could not be read: one bias-free lambda_proj row per signal head, the gate's width (elementwise over the
normed output), kv_b_proj's per-key-head [no-RoPE key | value] layout.

The two maps use different keys, so each goes through the attention kernel (reference or Triton) once, with
the values they share. The generation cache keeps MLA's latent and shared RoPE key only.
"""

from __future__ import annotations

import torch
from torch import nn

from kmodel.config import ModelConfig
from kmodel.kernels.attention import reference
from kmodel.model.attention import LayerCache
from kmodel.model.norm import RMSNorm
from kmodel.model.rope import apply_rope, yarn_softmax_scale


class DifferentialLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.noise_heads = cfg.num_noise_heads
        self.signal_heads = cfg.num_attention_heads - cfg.num_noise_heads
        self.grouped_ratio = self.signal_heads // self.noise_heads
        self.key_heads = cfg.num_key_value_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk = self.nope_dim + self.rope_dim
        self.window = cfg.window_of(layer_idx)
        self.use_rope = cfg.rope_layers == "all" or cfg.layer_types[layer_idx] == "sliding_attention"
        base_scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else qk**-0.5
        self.scale = base_scale * yarn_softmax_scale(cfg.rope_scaling)
        h, n, out = cfg.hidden_size, cfg.num_attention_heads, self.signal_heads * 2 * self.v_dim
        self.low_rank_query = cfg.q_lora_rank is not None
        if not self.low_rank_query:
            self.q_proj = nn.Linear(h, n * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm.of(cfg, cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm.of(cfg, self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.key_heads * (self.nope_dim + self.v_dim), bias=False)
        self.lambda_proj = nn.Linear(h, self.signal_heads, bias=False)
        self.subln = RMSNorm(2 * self.v_dim, cfg.attn_rms_norm_eps)
        self.gate_proj = nn.Linear(h, out, bias=False) if cfg.attention_output_gate else None
        self.o_proj = nn.Linear(out, h, bias=False)
        self.kernel = reference  # replaced by Model.use_kernels

    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal queries (batch, seq, signal heads, qk), noise queries (batch, seq, noise heads, qk)), RoPE
        applied to their RoPE parts."""
        batch, seq, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.low_rank_query else self.q_proj(x)
        q = q.view(batch, seq, -1, self.nope_dim + self.rope_dim)
        nope, rot = q.split((self.nope_dim, self.rope_dim), dim=-1)
        if self.use_rope:
            rot = apply_rope(rot, *rope)
        groups = torch.cat((nope, rot), dim=-1).view(batch, seq, self.noise_heads, self.grouped_ratio + 1, -1)
        signal = groups[:, :, :, :-1].reshape(batch, seq, self.signal_heads, -1)
        return signal, groups[:, :, :, -1]

    def expand(self, latent: torch.Tensor, rope_key: torch.Tensor):
        """(signal keys, noise keys (batch, seq, pairs, qk), pair values (batch, seq, pairs, 2v)) from the latent
        (batch, seq, kv_lora_rank) and the shared rotated key (batch, seq, rope)."""
        batch, seq, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch, seq, self.key_heads, self.nope_dim + self.v_dim)
        key_nope, values = kv.split((self.nope_dim, self.v_dim), dim=-1)
        shared = rope_key[:, :, None, :].expand(batch, seq, self.key_heads, self.rope_dim)
        pairs = torch.cat((key_nope, shared), dim=-1).view(batch, seq, self.key_heads // 2, 2, -1)
        return pairs[:, :, :, 0], pairs[:, :, :, 1], values.reshape(batch, seq, self.key_heads // 2, 2 * self.v_dim)

    def combine(self, x: torch.Tensor, signal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """signal (batch, seq, signal heads, 2v), noise (batch, seq, noise heads, 2v) -> the o_proj input."""
        batch, seq, _ = x.shape
        noise = noise.repeat_interleave(self.grouped_ratio, dim=2)  # each group's noise under its signal heads
        lam = torch.sigmoid(self.lambda_proj(x)).to(signal.dtype).unsqueeze(-1)  # (batch, seq, signal heads, 1)
        out = self.subln(signal - lam * noise).reshape(batch, seq, self.signal_heads * 2 * self.v_dim)
        if self.gate_proj is not None:
            out = out * torch.sigmoid(self.gate_proj(x))
        return out

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        batch = x.shape[0]
        q1, q2 = self.queries(x, rope)
        latent, rope_key = self.kv_a_proj_with_mqa(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        latent = self.kv_a_layernorm(latent)
        if self.use_rope:
            rope_key = apply_rope(rope_key[:, :, None, :], *rope)[:, :, 0, :]

        if cache is None or cache.keys is None:
            k1, k2, values = self.expand(latent, rope_key)
            maps = [
                self.kernel.attention(q, k, values, window=self.window, scale=self.scale, cu_seqlens=cu_seqlens)
                for q, k in ((q1, k1), (q2, k2))
            ]
            if cache is not None:
                cache.extend(latent, rope_key, positions)
        else:
            latents, rope_keys, _ = cache.extend(latent, rope_key, positions)
            k1, k2, values = self.expand(latents, rope_keys)
            lens = torch.full((batch,), k1.shape[1], device=x.device)
            maps = [
                self.kernel.decode_attention(q, k, values, cache_lens=lens, window=self.window, scale=self.scale)
                for q, k in ((q1, k1), (q2, k2))
            ]
        if cache is not None:
            cache.trim(self.window)
        return self.o_proj(self.combine(x, *maps))
