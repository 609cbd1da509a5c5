"""transformers families beyond the model-core three: qwen3_moe, deepseek_v3, axk1 (A.X K1), hyperclovax,
gpt_oss.

Each is a `Family` (see hf.py): what of a kmodel config the class cannot express, its config.json, and the
name table. kmodel's MLA, MoE and dense-MLP parameters already carry the names these classes use, so the
tables differ only in the norms and A.X K1's post-MoE norm; gpt-oss also stores its experts in another
layout (`_gpt_oss_transform`).
"""

from __future__ import annotations

import re

import torch

from kmodel.config import Config, ModelConfig
from kmodel.export.hf import Family, common_config, deepseek_style_moe_config, extras_problems, llama_style_rename, register

# transformers' DeepSeek-V3 builds its latent norms (q_a_layernorm, kv_a_layernorm) with this fixed eps;
# kmodel uses rms_norm_eps for every norm, so the two agree only when rms_norm_eps is this value.
DEEPSEEK_LATENT_NORM_EPS = 1e-6


def global_rope_problems(m: ModelConfig) -> list[str]:
    if "sliding_attention" in m.layer_types or m.rope_layers != "all":
        return ["sliding-window or NoPE layers (the class is global attention with RoPE on every layer)"]
    return []


def dense_layer_indices(m: ModelConfig) -> list[int]:
    return [i for i, kind in enumerate(m.mlp_layer_types) if kind == "dense"]


# --- Qwen3-MoE: GQA + QK-norm, softmax top-k routing, no shared expert --------------------------------


def _qwen3_moe_problems(m: ModelConfig) -> list[str]:
    problems = []
    if m.num_experts == 0:
        problems.append("no routed experts (num_experts = 0)")
    if m.num_shared_experts:
        problems.append("shared experts (Qwen3-MoE has none)")
    if m.router != "softmax":
        problems.append(f"router {m.router!r} (Qwen3-MoE routes by softmax, then top-k)")
    if m.n_group != 1:
        problems.append("group-limited routing (n_group > 1)")
    if m.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor {m.routed_scaling_factor} (the class has none)")
    if not m.qk_norm:
        problems.append("qk_norm off")
    if m.norm_placement != "pre":
        problems.append(f"norm_placement {m.norm_placement!r} (Qwen3-MoE is pre-norm)")
    return problems + global_rope_problems(m) + extras_problems(m)


def _qwen3_moe_config(cfg: Config) -> dict:
    m = cfg.model
    return {
        **common_config(cfg),
        "intermediate_size": m.intermediate_size,
        "attention_bias": False,
        "use_sliding_window": False,
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.num_experts_per_tok,
        "moe_intermediate_size": m.moe_intermediate_size,
        "norm_topk_prob": m.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layer_indices(m),
    }


def _qwen3_moe_rename(name: str, cfg: ModelConfig) -> str | None:
    if name.endswith("mlp.gate.e_score_correction_bias"):
        return None  # softmax routing never reads kmodel's (sigmoid-only) correction bias
    return llama_style_rename(name, cfg)


# --- DeepSeek-V3 and A.X K1: MLA + group-limited sigmoid routing with a shared expert -----------------


def _latent_moe_problems(m: ModelConfig) -> list[str]:
    """What neither DeepSeek-V3 nor A.X K1 can express (A.X K1 adds its own requirements on top)."""
    problems = []
    if m.attention_kind != "mla":
        problems.append(f"attention_kind {m.attention_kind!r} (the class uses multi-head latent attention)")
    if m.num_experts == 0:
        problems.append("no routed experts (num_experts = 0)")
    if m.num_experts and m.num_shared_experts == 0:
        problems.append("no shared expert (the class always has one)")
    if m.router != "sigmoid":
        problems.append(f"router {m.router!r} (the class routes with sigmoid scores + correction bias)")
    if m.n_group > 1 and m.num_experts // m.n_group < 2:
        problems.append("expert groups of one (the class scores a group by its best two experts)")
    if m.norm_placement != "pre":
        problems.append(f"norm_placement {m.norm_placement!r} (the class is pre-norm)")
    if m.rms_norm_eps != DEEPSEEK_LATENT_NORM_EPS:
        problems.append(f"rms_norm_eps {m.rms_norm_eps} (the class's latent norms use {DEEPSEEK_LATENT_NORM_EPS})")
    return problems + global_rope_problems(m)


def _latent_moe_config(cfg: Config) -> dict:
    m = cfg.model
    return {
        **common_config(cfg),
        "head_dim": m.qk_rope_head_dim,
        "intermediate_size": m.intermediate_size,
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        # kmodel rotates the RoPE dims in the rotate-half layout, not DeepSeek's interleaved pairs.
        "rope_interleave": False,
        "attention_bias": False,
        **deepseek_style_moe_config(m),
    }


def _deepseek_v3_problems(m: ModelConfig) -> list[str]:
    problems = _latent_moe_problems(m)
    dense = dense_layer_indices(m)
    if dense != list(range(len(dense))):
        problems.append("dense layers after the first MoE layer (DeepSeek-V3 has only first_k_dense_replace)")
    return problems + extras_problems(m, allow=("attention_kind", "rope_scaling"))


def _deepseek_v3_config(cfg: Config) -> dict:
    return {
        **_latent_moe_config(cfg),
        "first_k_dense_replace": len(dense_layer_indices(cfg.model)),
        "num_nextn_predict_layers": 0,  # the export drops kmodel's MTP head
    }


def _axk1_problems(m: ModelConfig) -> list[str]:
    problems = _latent_moe_problems(m)
    if m.attention_kind == "mla" and m.q_lora_rank is None:
        problems.append("full-rank query (A.X K1 always compresses the query: set q_lora_rank)")
    if m.num_experts and not m.post_mlp_norm:
        problems.append("post_mlp_norm off (A.X K1 normalises every MoE output)")
    return problems + extras_problems(m, allow=("attention_kind", "post_mlp_norm", "rope_scaling"))


def _axk1_config(cfg: Config) -> dict:
    return {**_latent_moe_config(cfg), "mlp_layer_types": cfg.model.mlp_layer_types}


def _axk1_rename(name: str, cfg: ModelConfig) -> str | None:
    match = re.fullmatch(r"layers\.(\d+)\.mlp\.post_mlp_norm\.weight", name)
    if match:
        return f"model.layers.{match.group(1)}.mlp.post_mlp_layernorm.weight"
    return llama_style_rename(name, cfg)


# --- HyperCLOVA X: dense GQA with Peri-LN (kmodel's 'sandwich') and muP multipliers -------------------

HYPERCLOVAX_NORM_NAMES = {
    ("sandwich", "attn_in_norm"): "input_layernorm",
    ("sandwich", "attn_out_norm"): "post_norm1",
    ("sandwich", "mlp_in_norm"): "post_attention_layernorm",
    ("sandwich", "mlp_out_norm"): "post_norm2",
}


def _hyperclovax_problems(m: ModelConfig) -> list[str]:
    problems = []
    if m.num_experts:
        problems.append("routed experts (HyperCLOVA X is dense)")
    if m.qk_norm:
        problems.append("qk_norm on (HyperCLOVA X has none)")
    if m.norm_placement != "sandwich":
        problems.append(f"norm_placement {m.norm_placement!r} (HyperCLOVA X is Peri-LN: 'sandwich')")
    if m.hidden_size % m.num_attention_heads:
        problems.append("hidden_size not divisible by num_attention_heads (the class requires it)")
    allowed = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
    return problems + global_rope_problems(m) + extras_problems(m, allow=allowed)


def _hyperclovax_config(cfg: Config) -> dict:
    m = cfg.model
    return {
        **common_config(cfg),
        "intermediate_size": m.intermediate_size,
        "attention_bias": False,
        "mlp_bias": False,
        "use_post_norm": True,
        "embedding_multiplier": m.embedding_multiplier,
        "residual_multiplier": m.residual_multiplier,
        "attention_multiplier": m.attention_multiplier if m.attention_multiplier is not None else m.head_dim**-0.5,
        "logits_scaling": m.logits_scaling,  # a multiplier in this class (Granite's is a divisor)
    }


def _hyperclovax_rename(name: str, cfg: ModelConfig) -> str | None:
    return llama_style_rename(name, cfg, HYPERCLOVAX_NORM_NAMES)


# --- gpt-oss: sinks, biases everywhere, softmax over the top-k logits, clamped SwiGLU, YaRN -------------

GPT_OSS_FEATURES = ("attention_bias", "attention_sinks", "router_bias", "expert_bias", "expert_activation")


def _gpt_oss_problems(m: ModelConfig) -> list[str]:
    problems = [f"{key} off (every gpt-oss layer has it)" for key in GPT_OSS_FEATURES[:4] if not getattr(m, key)]
    if m.expert_activation != "clamped_swiglu":
        problems.append(f"expert_activation {m.expert_activation!r} (gpt-oss uses 'clamped_swiglu')")
    if m.num_experts == 0 or "dense" in m.mlp_layer_types:
        problems.append("dense layers (every gpt-oss layer is MoE)")
    if m.num_shared_experts:
        problems.append("shared experts (gpt-oss has none)")
    if m.router != "softmax" or not m.norm_topk_prob:
        problems.append("routing other than softmax + norm_topk_prob (gpt-oss: softmax over the top-k logits)")
    if m.n_group != 1 or m.routed_scaling_factor != 1.0:
        problems.append("group-limited routing or routed_scaling_factor (gpt-oss has neither)")
    if m.qk_norm:
        problems.append("qk_norm on (gpt-oss has none)")
    if m.norm_placement != "pre":
        problems.append(f"norm_placement {m.norm_placement!r} (gpt-oss is pre-norm)")
    if m.rope_layers != "all":
        problems.append("NoPE layers (gpt-oss rotates every layer)")
    if m.rope_scaling is not None and m.rope_scaling.mscale_all_dim:
        problems.append("rope_scaling.mscale_all_dim (gpt-oss never rescales the softmax)")
    return problems + extras_problems(m, allow=GPT_OSS_FEATURES + ("rope_scaling",))


def _gpt_oss_config(cfg: Config) -> dict:
    m = cfg.model
    return {
        **common_config(cfg),
        "intermediate_size": m.moe_intermediate_size,
        "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.num_experts_per_tok,
        "sliding_window": m.sliding_window,
        "layer_types": m.layer_types,
        "attention_bias": True,
        "swiglu_alpha": m.swiglu_alpha,
        "swiglu_limit": m.swiglu_limit,
        "router_aux_loss_coef": m.aux_loss_coef,
    }


def _gpt_oss_rename(name: str, cfg: ModelConfig) -> str | None:
    if name.endswith("mlp.gate.e_score_correction_bias"):
        return None  # softmax routing never reads kmodel's (sigmoid-only) correction bias
    return llama_style_rename(name.replace(".mlp.gate.", ".mlp.router."), cfg)


def _gpt_oss_transform(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """gpt-oss keeps expert weights as (in, out) matrices and interleaves gate and up (gate in even, up in
    odd output columns); kmodel keeps nn.Linear's (out, in) with the gate in the first half."""
    if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.gate_up_proj_bias"):
        gate, up = tensor.chunk(2, dim=1)  # (E, I, ...) each
        interleaved = torch.stack((gate, up), dim=2).flatten(1, 2)  # rows g0, u0, g1, u1, ...
        return interleaved.transpose(1, 2) if name.endswith("gate_up_proj") else interleaved
    if name.endswith("mlp.experts.down_proj"):
        return tensor.transpose(1, 2)
    return tensor


register(Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_problems, _qwen3_moe_config, _qwen3_moe_rename))
register(Family("deepseek_v3", "DeepseekV3ForCausalLM", _deepseek_v3_problems, _deepseek_v3_config, llama_style_rename))
register(Family("axk1", "AXK1ForCausalLM", _axk1_problems, _axk1_config, _axk1_rename))
register(Family("hyperclovax", "HyperCLOVAXForCausalLM", _hyperclovax_problems, _hyperclovax_config, _hyperclovax_rename))
register(Family("gpt_oss", "GptOssForCausalLM", _gpt_oss_problems, _gpt_oss_config, _gpt_oss_rename, _gpt_oss_transform))
