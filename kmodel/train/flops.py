"""Model FLOPs per token and model FLOPs utilisation (MFU); the formula is written out in docs/training.md.

    training FLOPs / token = 3 * (2 * N_active + A)
    N_active = every matrix a token is multiplied by: attention and MLP projections, routers, shared experts,
               the routed experts scaled by top_k / num_experts, the output head (once more for the MTP head);
               not the embedding lookup
    A        = sum over attention layers (MTP's included) of 2 * heads * (qk_dim + v_dim) * keys_seen,
               keys_seen = the mean number of keys a query attends to: (S + 1) / 2 causal, capped by the window
    MFU      = FLOPs / token * tokens / s / (peak FLOP/s of the device)

The factor 3 is one forward and a backward that costs two forwards. Document masking, which lets a query
see fewer keys, is not discounted, so MFU is slightly overstated for it.
"""

from __future__ import annotations

import torch

from kmodel.config import ModelConfig

# Dense bf16 tensor-core peaks per device, from the vendors' data sheets (no sparsity).
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
        if param.ndim < 2 or name.endswith("bias") or name == "embed_tokens.weight":
            continue  # norms, biases (stacked expert biases are 2-D) and the lookup table do no matmul
        # A token uses top_k of the stacked experts; per held row that is top_k / rows, so a rank holding an
        # expert-parallel shard counts the same active parameters as the full model.
        share = cfg.num_experts_per_tok / param.shape[0] if ".experts." in name else 1.0
        total += param.numel() * share
    head = cfg.hidden_size * cfg.vocab_size
    if cfg.tie_word_embeddings:
        total += head  # the embedding matrix doubles as the output projection
    total += cfg.num_nextn_predict_layers * head  # each MTP depth's prediction goes through the shared head again
    return total


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    if cfg.attention_kind == "mla":
        qk_dim, v_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk_dim = v_dim = cfg.head_dim
    layer_types = list(cfg.layer_types) + [cfg.layer_types[-1]] * cfg.num_nextn_predict_layers
    flops = 0.0
    for kind in layer_types:
        window = cfg.sliding_window if kind == "sliding_attention" else None
        flops += 2 * cfg.num_attention_heads * (qk_dim + v_dim) * mean_keys_seen(seq_len, window)
    return flops


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    return 3 * (2 * active_matmul_params(model) + attention_flops_per_token(model.cfg, seq_len))


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where MFU is not reported (CPU, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
