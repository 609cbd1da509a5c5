"""What a Hugging Face export family is, the registry of families, and the pieces families share.

A `Family` describes one transformers architecture: which kmodel configs it can express (`problems` lists
what it cannot, so an unfit config is refused by name rather than silently approximated), its config.json,
the table from kmodel parameter names to its own, and what the export leaves out (`notes`). The problem
predicates below are shared so the same missing feature reads the same in every family's refusal.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kmodel.config import Config, ModelConfig


class ExportError(ValueError):
    """The checkpoint cannot be expressed in the requested format; the message names the feature."""


def _identity(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return tensor


def mtp_dropped(m: ModelConfig) -> list[str]:
    """The default note: the class has no names for MTP weights, so the export is the main model."""
    if not m.num_nextn_predict_layers:
        return []
    return [f"drops the {m.num_nextn_predict_layers} MTP depth(s) (mtp.*): this class has no names for them"]


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    problems: Callable[[ModelConfig], list[str]]  # features of the config this class cannot express
    config_json: Callable[[Config], dict]
    rename: Callable[[str, ModelConfig], str | None]  # kmodel name -> HF name; None drops the tensor
    # kmodel name, tensor -> the tensor in the class's layout (identity unless the family stores it differently)
    transform: Callable[[str, torch.Tensor, ModelConfig], torch.Tensor] = _identity
    # what the export leaves out of an expressible config (said, not refused): by default the MTP depths
    notes: Callable[[ModelConfig], list[str]] = mtp_dropped


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def choose_family(m: ModelConfig, family: str | None = None) -> Family:
    """The named family (refused with its problems), or the first registered one that fits."""
    if family is not None:
        if family not in FAMILIES:
            raise ExportError(f"unknown transformers family {family!r}; known: {sorted(FAMILIES)}")
        problems = FAMILIES[family].problems(m)
        if problems:
            raise ExportError(f"{family} cannot express this config: " + "; ".join(problems))
        return FAMILIES[family]
    reasons = {}
    for candidate in FAMILIES.values():
        problems = candidate.problems(m)
        if not problems:
            return candidate
        reasons[candidate.model_type] = problems
    detail = "\n".join(f"  {name}: {'; '.join(p)}" for name, p in reasons.items())
    raise ExportError(f"no transformers class can express this config:\n{detail}")


# --- names -------------------------------------------------------------------------------------------

NORM_NAMES = {
    # (placement, kmodel norm) -> HF norm name
    ("pre", "attn_in_norm"): "input_layernorm",
    ("pre", "mlp_in_norm"): "post_attention_layernorm",
    ("post", "attn_out_norm"): "post_attention_layernorm",
    ("post", "mlp_out_norm"): "post_feedforward_layernorm",
}
LAYER_NORMS = {"attn_in_norm", "attn_out_norm", "mlp_in_norm", "mlp_out_norm"}


def layer_rename(rest: str, cfg: ModelConfig, norm_names: dict = NORM_NAMES) -> str:
    """A name inside one decoder layer (after `layers.N.`), with the norms renamed by placement."""
    match = re.fullmatch(r"(\w+_norm)\.weight", rest)
    if match and match.group(1) in LAYER_NORMS:
        hf = norm_names.get((cfg.norm_placement, match.group(1)))
        if hf is None:
            raise ExportError(f"norm placement {cfg.norm_placement!r} has no Hugging Face name for {rest}")
        return f"{hf}.weight"
    return rest


def llama_style_rename(name: str, cfg: ModelConfig, norm_names: dict = NORM_NAMES) -> str | None:
    """kmodel names are HF's already, except the norms (named by position) and the `model.` prefix.
    `norm_names` maps (placement, kmodel norm) to the family's norm name. MTP depths are dropped."""
    if name.startswith("mtp."):
        return None
    if name == "lm_head.weight":
        return name
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match:
        return f"model.layers.{match.group(1)}.{layer_rename(match.group(2), cfg, norm_names)}"
    return f"model.{name}"


MTP_NAME = re.compile(r"mtp\.(\d+)\.(.+)")


# --- config.json pieces ---------------------------------------------------------------------------


def common_config(cfg: Config) -> dict:
    m = cfg.model
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_hidden_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.rms_norm_eps,
        "initializer_range": m.initializer_range,
        "tie_word_embeddings": m.tie_word_embeddings,
        "rope_parameters": rope_parameters(m),
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }


def rope_parameters(m: ModelConfig) -> dict:
    if m.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    scaling = {key: value for key, value in m.rope_scaling.model_dump().items() if value is not None}
    return {"rope_theta": m.rope_theta, **scaling}


def hybrid_attention_config(m: ModelConfig) -> dict:
    """EXAONE's convention: with a sliding window set, RoPE runs on sliding layers only; without, everywhere."""
    has_sliding = "sliding_attention" in m.layer_types
    window = m.sliding_window if (has_sliding or m.rope_layers == "sliding") else None
    return {"sliding_window": window, "layer_types": m.layer_types, "sliding_window_pattern": None}


def deepseek_style_moe_config(m: ModelConfig) -> dict:
    """MoE keys under DeepSeek's names, which Solar Open, DeepSeek-V3 and A.X K1 share."""
    return {
        "n_routed_experts": m.num_experts,
        "n_shared_experts": m.num_shared_experts,
        "num_experts_per_tok": m.num_experts_per_tok,
        "moe_intermediate_size": m.moe_intermediate_size,
        "norm_topk_prob": m.norm_topk_prob,
        "routed_scaling_factor": m.routed_scaling_factor,
        "n_group": m.n_group,
        "topk_group": m.topk_group,
    }


def dense_layer_indices(m: ModelConfig) -> list[int]:
    return [i for i, kind in enumerate(m.mlp_layer_types) if kind == "dense"]


# --- shared problem predicates: each returns the problems it finds, worded the same for every family ---


def needs_routed_experts(m: ModelConfig) -> list[str]:
    return ["no routed experts (num_experts = 0)"] if m.num_experts == 0 else []


def needs_shared_expert(m: ModelConfig) -> list[str]:
    return ["no shared expert (the class always has one)"] if m.num_experts and m.num_shared_experts == 0 else []


def no_shared_experts(m: ModelConfig, label: str) -> list[str]:
    return [f"shared experts ({label} has none)"] if m.num_shared_experts else []


def dense_only(m: ModelConfig, label: str) -> list[str]:
    return [f"routed experts ({label} is dense)"] if m.num_experts else []


def every_layer_sparse(m: ModelConfig, label: str) -> list[str]:
    if m.num_experts == 0 or "dense" in m.mlp_layer_types:
        return [f"dense layers (every {label} layer is MoE)"]
    return []


def qk_norm_is(m: ModelConfig, wanted: bool, label: str) -> list[str]:
    if m.qk_norm == wanted:
        return []
    return ["qk_norm off"] if wanted else [f"qk_norm on ({label} has none)"]


def norm_placement_is(m: ModelConfig, wanted: str, label: str) -> list[str]:
    if m.norm_placement == wanted:
        return []
    return [f"norm_placement {m.norm_placement!r} ({label} uses {wanted!r})"]


def router_is(m: ModelConfig, wanted: str, how: str) -> list[str]:
    return [f"router {m.router!r} (the class routes {how})"] if m.router != wanted else []


def sigmoid_router(m: ModelConfig) -> list[str]:
    return router_is(m, "sigmoid", "with sigmoid scores + correction bias")


def global_rope(m: ModelConfig) -> list[str]:
    if "sliding_attention" in m.layer_types or m.rope_layers != "all":
        return ["sliding-window or NoPE layers (the class is global attention with RoPE on every layer)"]
    return []


def hybrid_attention_problems(m: ModelConfig) -> list[str]:
    has_sliding = "sliding_attention" in m.layer_types
    if has_sliding and m.rope_layers != "sliding":
        return ["RoPE on global layers together with sliding layers (EXAONE uses NoPE on global layers)"]
    if m.rope_layers == "sliding" and m.sliding_window is None:
        return ["rope_layers 'sliding' without a sliding_window"]
    return []


def extras_problems(m: ModelConfig, *, allow: tuple[str, ...] = ()) -> list[str]:
    """Features only some families have (MLA, A.X K1's post-MoE norm, muP multipliers, gpt-oss's biases,
    sinks and activation, YaRN, per-layer-type theta, (1 + w) norms, per-layer windows and SwiGLU clamps,
    differential attention, PolyNorm, hyper-connections), named where set but not in `allow`."""
    present = {
        "attention_bias": m.attention_bias,
        "attention_sinks": m.attention_sinks,
        "router_bias": m.router_bias,
        "expert_bias": m.expert_bias,
        "expert_activation": m.expert_activation != "swiglu",
        "rope_scaling": m.rope_scaling is not None,
        "rope_local_base_freq": m.rope_local_base_freq is not None,
        "norm_weight_plus_one": m.norm_weight_plus_one,
        "attention_kind": m.attention_kind != "gqa",
        "post_mlp_norm": m.post_mlp_norm,
        "embedding_multiplier": m.embedding_multiplier != 1.0,
        "residual_multiplier": m.residual_multiplier != 1.0,
        "attention_multiplier": m.attention_multiplier is not None,
        "logits_scaling": m.logits_scaling != 1.0,
        "sliding_windows": m.sliding_windows is not None and len({w for w in m.sliding_windows if w}) > 1,
        "swiglu_limits": m.swiglu_limits is not None and any(m.swiglu_limits),
        "mlp_activation": m.mlp_activation != "swiglu",
        "hc_mult": m.hc_mult > 1,
    }
    return [
        f"{key} {getattr(m, key)!r} (this class has no such feature)"
        for key, is_set in present.items()
        if is_set and key not in allow
    ]

