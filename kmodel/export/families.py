"""The transformers families kmodel exports to: exaone_moe (K-EXAONE), solar_open, exaone4, qwen3_moe,
deepseek_v3, axk1 (A.X K1), hyperclovax, gpt_oss.

Each is a `Family` (kmodel/export/family.py): what of a kmodel config the class cannot express, its
config.json, the name table, and what the export leaves out. kmodel's MLA, MoE and dense-MLP parameters
already carry the names these classes use, so the tables differ mostly in the norms; gpt-oss also stores its
experts in another layout (`_gpt_oss_transform`). MTP depths are kept where the class or the published
checkpoints name them (DeepSeek-V3: extra layers after num_hidden_layers; K-EXAONE: `mtp.*`), else dropped
with a note.
"""

from __future__ import annotations

import re

import torch

from kmodel.config import Config, ModelConfig
from kmodel.export.family import (
    MTP_NAME,
    Family,
    common_config,
    deepseek_style_moe_config,
    dense_layer_indices,
    dense_only,
    every_layer_sparse,
    extras_problems,
    global_rope,
    hybrid_attention_config,
    hybrid_attention_problems,
    layer_rename,
    llama_style_rename,
    needs_routed_experts,
    needs_shared_expert,
    no_shared_experts,
    norm_placement_is,
    qk_norm_is,
    register,
    router_is,
    sigmoid_router,
)

# transformers' DeepSeek-V3 builds its latent norms (q_a_layernorm, kv_a_layernorm) with this fixed eps;
# kmodel uses rms_norm_eps for every norm, so the two agree only when rms_norm_eps is this value.
DEEPSEEK_LATENT_NORM_EPS = 1e-6


# --- K-EXAONE (exaone_moe): hybrid sliding/global with NoPE global layers, sigmoid MoE + shared expert --------


def _exaone_moe_problems(m: ModelConfig) -> list[str]:
    return [
        *needs_routed_experts(m),
        *needs_shared_expert(m),
        *qk_norm_is(m, True, "K-EXAONE"),
        *norm_placement_is(m, "pre", "K-EXAONE"),
        *sigmoid_router(m),
        *hybrid_attention_problems(m),
        *extras_problems(m),
    ]


def _exaone_moe_keeps_mtp(m: ModelConfig) -> bool:
    """K-EXAONE's checkpoints hold one MTP module (`mtp.fc`, `mtp.pre_fc_norm_embedding`,
    `mtp.pre_fc_norm_hidden`, `mtp.layers.0`, `mtp.norm`; vLLM's exaone_moe_mtp) with a dense feed-forward."""
    return m.num_nextn_predict_layers == 1 and m.mtp_mlp_type == "dense"


def _exaone_moe_config(cfg: Config) -> dict:
    m = cfg.model
    config = {
        **common_config(cfg),
        **hybrid_attention_config(m),
        "intermediate_size": m.intermediate_size,
        "mlp_layer_types": m.mlp_layer_types,
        "first_k_dense_replace": m.mlp_layer_types.index("sparse") if "sparse" in m.mlp_layer_types else m.num_hidden_layers,
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.num_experts_per_tok,
        "num_shared_experts": m.num_shared_experts,
        "moe_intermediate_size": m.moe_intermediate_size,
        "norm_topk_prob": m.norm_topk_prob,
        "routed_scaling_factor": m.routed_scaling_factor,
        "n_group": m.n_group,
        "topk_group": m.topk_group,
    }
    if _exaone_moe_keeps_mtp(m):
        config.update(num_nextn_predict_layers=1, mtp_layer_types=[m.layer_types[-1]])
    return config


EXAONE_MTP_NAMES = {
    "eh_proj.weight": "fc.weight",
    "enorm.weight": "pre_fc_norm_embedding.weight",
    "hnorm.weight": "pre_fc_norm_hidden.weight",
    "norm.weight": "norm.weight",
}


def _exaone_moe_rename(name: str, cfg: ModelConfig) -> str | None:
    match = MTP_NAME.fullmatch(name)
    if match is None:
        return llama_style_rename(name, cfg)
    if not _exaone_moe_keeps_mtp(cfg):
        return None
    rest = match.group(2)
    if rest.startswith("block."):
        return f"mtp.layers.{match.group(1)}.{layer_rename(rest.removeprefix('block.'), cfg)}"
    return f"mtp.{EXAONE_MTP_NAMES[rest]}"


def _exaone_moe_notes(m: ModelConfig) -> list[str]:
    if not m.num_nextn_predict_layers or _exaone_moe_keeps_mtp(m):
        return []
    return [
        (
            f"drops the {m.num_nextn_predict_layers} MTP depth(s) (mtp.*): K-EXAONE's checkpoint layout holds one "
            f"MTP module with a dense feed-forward (this config: depth {m.num_nextn_predict_layers}, "
            f"mtp_mlp_type {m.mtp_mlp_type!r})"
        )
    ]


# --- EXAONE 4.0: dense, post-norm, hybrid attention -----------------------------------------------------


def _exaone4_problems(m: ModelConfig) -> list[str]:
    return [
        *dense_only(m, "EXAONE 4.0"),
        *qk_norm_is(m, True, "EXAONE 4.0"),
        *norm_placement_is(m, "post", "EXAONE 4.0"),
        *hybrid_attention_problems(m),
        *extras_problems(m),
    ]


def _exaone4_config(cfg: Config) -> dict:
    return {**common_config(cfg), **hybrid_attention_config(cfg.model), "intermediate_size": cfg.model.intermediate_size}


# --- Solar Open: global GQA, sigmoid MoE + shared expert on every layer, no QK-norm -------------------------


def _solar_open_problems(m: ModelConfig) -> list[str]:
    return [
        *needs_routed_experts(m),
        *needs_shared_expert(m),
        *every_layer_sparse(m, "Solar Open"),
        *qk_norm_is(m, False, "Solar Open"),
        *norm_placement_is(m, "pre", "Solar Open"),
        *global_rope(m),
        *sigmoid_router(m),
        *extras_problems(m),
    ]


def _solar_open_config(cfg: Config) -> dict:
    return {**common_config(cfg), "attention_bias": False, **deepseek_style_moe_config(cfg.model)}


# --- Qwen3-MoE: GQA + QK-norm, softmax top-k routing, no shared expert --------------------------------


def _qwen3_moe_problems(m: ModelConfig) -> list[str]:
    problems = [
        *needs_routed_experts(m),
        *no_shared_experts(m, "Qwen3-MoE"),
        *router_is(m, "softmax", "by softmax, then top-k"),
        *qk_norm_is(m, True, "Qwen3-MoE"),
        *norm_placement_is(m, "pre", "Qwen3-MoE"),
        *global_rope(m),
    ]
    if m.n_group != 1:
        problems.append("group-limited routing (n_group > 1)")
    if m.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor {m.routed_scaling_factor} (the class has none)")
    return problems + extras_problems(m)


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


def _softmax_routed_rename(name: str, cfg: ModelConfig) -> str | None:
    if name.endswith("mlp.gate.e_score_correction_bias"):
        return None  # softmax routing never reads kmodel's (sigmoid-only) correction bias
    return llama_style_rename(name, cfg)


# --- DeepSeek-V3 and A.X K1: MLA + group-limited sigmoid routing with a shared expert -----------------


def _latent_moe_problems(m: ModelConfig) -> list[str]:
    """What neither DeepSeek-V3 nor A.X K1 can express (A.X K1 adds its own requirements on top)."""
    problems = []
    if m.attention_kind != "mla":
        problems.append(f"attention_kind {m.attention_kind!r} (the class uses multi-head latent attention)")
    problems += [*needs_routed_experts(m), *needs_shared_expert(m), *sigmoid_router(m)]
    if m.n_group > 1 and m.num_experts // m.n_group < 2:
        problems.append("expert groups of one (the class scores a group by its best two experts)")
    problems += norm_placement_is(m, "pre", "the class")
    if m.rms_norm_eps != DEEPSEEK_LATENT_NORM_EPS:
        problems.append(f"rms_norm_eps {m.rms_norm_eps} (the class's latent norms use {DEEPSEEK_LATENT_NORM_EPS})")
    return problems + global_rope(m)


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


def _deepseek_v3_keeps_mtp(m: ModelConfig) -> bool:
    """DeepSeek-V3 stores MTP depth k as layer num_hidden_layers + k; transformers' MtpModel builds those
    layers as MoE layers."""
    return m.mtp_mlp_type == "sparse"


def _deepseek_v3_config(cfg: Config) -> dict:
    m = cfg.model
    return {
        **_latent_moe_config(cfg),
        "first_k_dense_replace": len(dense_layer_indices(m)),
        "num_nextn_predict_layers": m.num_nextn_predict_layers if _deepseek_v3_keeps_mtp(m) else 0,
    }


DEEPSEEK_MTP_NAMES = {
    "eh_proj.weight": "eh_proj.weight",
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "norm.weight": "shared_head.norm.weight",
}


def _deepseek_v3_rename(name: str, cfg: ModelConfig) -> str | None:
    match = MTP_NAME.fullmatch(name)
    if match is None:
        return llama_style_rename(name, cfg)
    if not _deepseek_v3_keeps_mtp(cfg):
        return None
    layer, rest = cfg.num_hidden_layers + int(match.group(1)), match.group(2)
    if rest.startswith("block."):
        return f"model.layers.{layer}.{layer_rename(rest.removeprefix('block.'), cfg)}"
    return f"model.layers.{layer}.{DEEPSEEK_MTP_NAMES[rest]}"


def _deepseek_v3_notes(m: ModelConfig) -> list[str]:
    depth = m.num_nextn_predict_layers
    if not depth:
        return []
    if not _deepseek_v3_keeps_mtp(m):
        return [f"drops the {depth} MTP depth(s) (mtp.*): DeepSeek-V3's MTP layers are MoE layers (mtp_mlp_type 'dense')"]
    if depth > 1:
        return [
            (
                "keeps all MTP depths as layers after num_hidden_layers; transformers' MtpModel feeds depth k + 1 "
                "with depth k's normalised output, kmodel (as the DeepSeek-V3 paper) with the un-normalised one, so "
                "its drafts from depth 2 on differ from kmodel's"
            )
        ]
    return []


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
    problems = [
        *dense_only(m, "HyperCLOVA X"),
        *qk_norm_is(m, False, "HyperCLOVA X"),
        *norm_placement_is(m, "sandwich", "HyperCLOVA X's Peri-LN"),
    ]
    if m.hidden_size % m.num_attention_heads:
        problems.append("hidden_size not divisible by num_attention_heads (the class requires it)")
    allowed = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
    return problems + global_rope(m) + extras_problems(m, allow=allowed)


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
    problems += [*every_layer_sparse(m, "gpt-oss"), *no_shared_experts(m, "gpt-oss")]
    if m.router != "softmax" or not m.norm_topk_prob:
        problems.append("routing other than softmax + norm_topk_prob (gpt-oss: softmax over the top-k logits)")
    if m.n_group != 1 or m.routed_scaling_factor != 1.0:
        problems.append("group-limited routing or routed_scaling_factor (gpt-oss has neither)")
    problems += [*qk_norm_is(m, False, "gpt-oss"), *norm_placement_is(m, "pre", "gpt-oss")]
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
    renamed = _softmax_routed_rename(name, cfg)
    return None if renamed is None else renamed.replace(".mlp.gate.", ".mlp.router.")


def _gpt_oss_transform(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """gpt-oss keeps expert weights as (in, out) matrices and interleaves gate and up (gate in even, up in
    odd output columns); kmodel keeps nn.Linear's (out, in) with the gate in the first half."""
    if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias")):
        gate, up = tensor.chunk(2, dim=1)  # (E, I, ...) each
        interleaved = torch.stack((gate, up), dim=2).flatten(1, 2)  # rows g0, u0, g1, u1, ...
        return interleaved.transpose(1, 2) if name.endswith("gate_up_proj") else interleaved
    if name.endswith("mlp.experts.down_proj"):
        return tensor.transpose(1, 2)
    return tensor


# Registration order is the order `choose_family` tries when no family is named.
register(Family("exaone_moe", "ExaoneMoeForCausalLM", _exaone_moe_problems, _exaone_moe_config, _exaone_moe_rename,
                notes=_exaone_moe_notes))
register(Family("solar_open", "SolarOpenForCausalLM", _solar_open_problems, _solar_open_config, llama_style_rename))
register(Family("exaone4", "Exaone4ForCausalLM", _exaone4_problems, _exaone4_config, llama_style_rename))
register(Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_problems, _qwen3_moe_config, _softmax_routed_rename))
register(Family("deepseek_v3", "DeepseekV3ForCausalLM", _deepseek_v3_problems, _deepseek_v3_config,
                _deepseek_v3_rename, notes=_deepseek_v3_notes))
register(Family("axk1", "AXK1ForCausalLM", _axk1_problems, _axk1_config, _axk1_rename))
register(Family("hyperclovax", "HyperCLOVAXForCausalLM", _hyperclovax_problems, _hyperclovax_config, _hyperclovax_rename))
register(Family("gpt_oss", "GptOssForCausalLM", _gpt_oss_problems, _gpt_oss_config, _gpt_oss_rename, _gpt_oss_transform))
