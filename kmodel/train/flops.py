"""Model FLOPs per token and model FLOPs utilisation (MFU); the formula is written out in docs/training.md.

    training FLOPs / token = 3 * (2 * N_active + A)
    N_active = every parameter a token uses but the embedding lookup: attention and MLP projections, routers,
               shared experts, the routed experts scaled by top_k / num_experts, the output head (once more per
               MTP depth); norm weights and biases are in too (a rounding error, as in the planner's count)
    A        = sum over attention layers (MTP's included) of 2 * heads * (qk_dim + v_dim) * keys_seen,
               keys_seen = the mean number of keys a query attends to: (S + 1) / 2 causal, capped by the window
    MFU      = FLOPs / token * tokens / s / (peak FLOP/s of the device)

The factor 3 is one forward and a backward that costs two forwards. Document masking, which lets a query
see fewer keys, is not discounted, so MFU is slightly overstated for it.

This module is the one home of the formula, the attention term and the GPU peaks: the planner (kmodel.plan)
calls the same functions with its config-derived parameter counts, so training MFU and planned MFU agree.
"""

from __future__ import annotations

import torch

from kmodel.config import ModelConfig

# Dense bf16 tensor-core peaks per device, from the vendors' data sheets (no sparsity); the planner's GPU
# table takes its peaks from here.
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # H100 SXM; the PCIe part is lower (756 TFLOP/s)
    "H200": 989e12,
    "A100": 312e12,
}


def mean_keys_seen(seq_len: int, window: int | None) -> float:
    """Mean over query positions 0..S-1 of the keys visible under causal (and sliding-window) masking."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def active_matmul_params(model: torch.nn.Module) -> float:
    cfg: ModelConfig = model.cfg
    total = 0.0
    for name, param in model.named_parameters():
        if name == "embed_tokens.weight":
            continue  # the lookup table does no matmul (norm weights and biases, ~1 FLOP per element per token,
            # are counted as the planner counts them: a rounding error, the same on both sides)
        # A token uses top_k of the stacked experts; per held row that is top_k / rows, so a rank holding an
        # expert-parallel shard counts the same active parameters as the full model.
        share = cfg.num_experts_per_tok / param.shape[0] if ".experts." in name else 1.0
        total += param.numel() * share
    head = cfg.hidden_size * cfg.vocab_size
    if cfg.tie_word_embeddings:
        total += head  # the embedding matrix doubles as the output projection
    total += cfg.num_nextn_predict_layers * head  # each MTP depth's prediction goes through the shared head again
    return total


def attention_head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(query/key dims, value dims) per head: head_dim for both under GQA; nope + rope and v_head_dim for MLA,
    whose keys and values are expanded from the latent to every head before the attention product."""
    if cfg.attention_kind == "mla":
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.attention_kind == "differential":  # each query head's map (signal or noise) weighs 2 * head_dim values
        return cfg.head_dim, 2 * cfg.head_dim
    if cfg.attention_kind == "differential_latent":  # as differential: every query head's map weighs 2v values
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, 2 * cfg.v_head_dim
    return cfg.head_dim, cfg.head_dim


def layer_attention_flops_per_token(cfg: ModelConfig, seq_len: int, layer_idx: int) -> float:
    """Forward FLOPs of QK^T and PV per token in decoder layer `layer_idx` (under its own window)."""
    qk_dim, v_dim = attention_head_dims(cfg)
    per_key = 2 * cfg.num_attention_heads * (qk_dim + v_dim)  # 2 * heads * qk for QK^T + 2 * heads * v for PV
    return per_key * mean_keys_seen(seq_len, cfg.window_of(layer_idx))


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of QK^T and PV per token, summed over the layers and every MTP depth (each runs a copy of
    the last layer's attention)."""
    last = cfg.num_hidden_layers - 1
    layers = list(range(cfg.num_hidden_layers)) + [last] * cfg.num_nextn_predict_layers
    return sum(layer_attention_flops_per_token(cfg, seq_len, i) for i in layers)


def flops_per_token(matmul_params: float, cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (no recomputation) for `matmul_params` parameters a token multiplies with."""
    return 3 * (2 * matmul_params + attention_flops_per_token(cfg, seq_len))


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    return flops_per_token(active_matmul_params(model), model.cfg, seq_len)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where MFU is not reported (CPU, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
