"""Export a kmodel checkpoint to a Hugging Face transformers directory.

Each transformers architecture is a `Family`: which configs it can express (`problems` lists what it
cannot, so an unfit config is refused by name rather than silently approximated), its config.json, and
the table from kmodel parameter names to its own. kmodel never imports transformers: the output is
plain JSON and safetensors that transformers' built-in classes load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from kmodel.checkpoint import TOKENIZER_DIR, load_config_from_checkpoint, read_weights, resolve_checkpoint
from kmodel.config import Config, ModelConfig


class ExportError(ValueError):
    """The checkpoint cannot be expressed in the requested format; the message names the feature."""


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    problems: Callable[[ModelConfig], list[str]]  # features of the config this class cannot express
    config_json: Callable[[Config], dict]
    rename: Callable[[str, ModelConfig], str | None]  # kmodel name -> HF name; None drops the tensor
    # kmodel name, tensor -> the tensor in the class's layout (identity unless the family stores it differently)
    transform: Callable[[str, torch.Tensor, ModelConfig], torch.Tensor] = lambda name, tensor, cfg: tensor


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


# --- pieces several families share ------------------------------------------------------------------

NORM_NAMES = {
    # (placement, kmodel norm) -> HF norm name
    ("pre", "attn_in_norm"): "input_layernorm",
    ("pre", "mlp_in_norm"): "post_attention_layernorm",
    ("post", "attn_out_norm"): "post_attention_layernorm",
    ("post", "mlp_out_norm"): "post_feedforward_layernorm",
}


def llama_style_rename(name: str, cfg: ModelConfig, norm_names: dict = NORM_NAMES) -> str | None:
    """kmodel names are HF's already, except the norms (named by position) and the `model.` prefix.
    `norm_names` maps (placement, kmodel norm) to the family's norm name."""
    if name.startswith("mtp."):
        return None  # transformers' classes have no MTP head; the export is the main model
    if name == "lm_head.weight":
        return name
    match = re.fullmatch(r"layers\.(\d+)\.(\w+_norm)\.weight", name)
    if match and match.group(2) in {"attn_in_norm", "attn_out_norm", "mlp_in_norm", "mlp_out_norm"}:
        hf = norm_names.get((cfg.norm_placement, match.group(2)))
        if hf is None:
            raise ExportError(f"norm placement {cfg.norm_placement!r} has no Hugging Face name for {name}")
        return f"model.layers.{match.group(1)}.{hf}.weight"
    return f"model.{name}"


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


def hybrid_attention_problems(m: ModelConfig) -> list[str]:
    has_sliding = "sliding_attention" in m.layer_types
    if has_sliding and m.rope_layers != "sliding":
        return ["RoPE on global layers together with sliding layers (EXAONE uses NoPE on global layers)"]
    if m.rope_layers == "sliding" and m.sliding_window is None:
        return ["rope_layers 'sliding' without a sliding_window"]
    return []


def extras_problems(m: ModelConfig, *, allow: tuple[str, ...] = ()) -> list[str]:
    """Features only some families have (MLA, A.X K1's post-MoE norm, muP multipliers, gpt-oss's biases,
    sinks and activation, YaRN, per-layer-type theta, (1 + w) norms), named where set but not in `allow`."""
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
    }
    return [
        f"{key} {getattr(m, key)!r} (this class has no such feature)"
        for key, is_set in present.items()
        if is_set and key not in allow
    ]


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


def router_problems(m: ModelConfig) -> list[str]:
    problems = []
    if m.router != "sigmoid":
        problems.append(f"router {m.router!r} (this class routes with sigmoid scores + correction bias)")
    return problems


# --- families -------------------------------------------------------------------------------------------


def _exaone_moe_problems(m: ModelConfig) -> list[str]:
    problems = []
    if m.num_experts == 0:
        problems.append("no routed experts (num_experts = 0)")
    if m.num_experts and m.num_shared_experts == 0:
        problems.append("no shared expert (the class always has one)")
    if not m.qk_norm:
        problems.append("qk_norm off")
    if m.norm_placement != "pre":
        problems.append(f"norm_placement {m.norm_placement!r} (the class is pre-norm)")
    return problems + router_problems(m) + hybrid_attention_problems(m) + extras_problems(m)


def _exaone_moe_config(cfg: Config) -> dict:
    m = cfg.model
    return {
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


def _exaone4_problems(m: ModelConfig) -> list[str]:
    problems = []
    if m.num_experts:
        problems.append("routed experts (EXAONE 4.0 is dense)")
    if not m.qk_norm:
        problems.append("qk_norm off")
    if m.norm_placement != "post":
        problems.append(f"norm_placement {m.norm_placement!r} (EXAONE 4.0 normalises sublayer outputs: 'post')")
    return problems + hybrid_attention_problems(m) + extras_problems(m)


def _exaone4_config(cfg: Config) -> dict:
    return {**common_config(cfg), **hybrid_attention_config(cfg.model), "intermediate_size": cfg.model.intermediate_size}


def _solar_open_problems(m: ModelConfig) -> list[str]:
    problems = []
    if m.num_experts == 0:
        problems.append("no routed experts (num_experts = 0)")
    if m.num_shared_experts == 0:
        problems.append("no shared expert (the class always has one)")
    if "dense" in m.mlp_layer_types:
        problems.append("dense layers (every Solar Open layer is MoE)")
    if m.qk_norm:
        problems.append("qk_norm on (Solar Open has none)")
    if m.norm_placement != "pre":
        problems.append(f"norm_placement {m.norm_placement!r} (Solar Open is pre-norm)")
    if "sliding_attention" in m.layer_types or m.rope_layers != "all":
        problems.append("sliding-window layers or NoPE layers (Solar Open is global attention with RoPE)")
    return problems + router_problems(m) + extras_problems(m)


def _solar_open_config(cfg: Config) -> dict:
    m = cfg.model
    return {
        **common_config(cfg),
        "attention_bias": False,
        **deepseek_style_moe_config(m),
    }


register(Family("exaone_moe", "ExaoneMoeForCausalLM", _exaone_moe_problems, _exaone_moe_config, llama_style_rename))
register(Family("solar_open", "SolarOpenForCausalLM", _solar_open_problems, _solar_open_config, llama_style_rename))
register(Family("exaone4", "Exaone4ForCausalLM", _exaone4_problems, _exaone4_config, llama_style_rename))


# --- the export itself --------------------------------------------------------------------------------


def choose_family(m: ModelConfig, family: str | None = None) -> Family:
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


def hf_state_dict(weights: dict[str, torch.Tensor], cfg: Config, family: Family) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in weights.items():
        hf_name = family.rename(name, cfg.model)
        if hf_name is None:
            continue
        if hf_name in out:
            raise ExportError(f"two kmodel tensors map to {hf_name}")
        out[hf_name] = family.transform(name, tensor, cfg.model).contiguous()
    return out


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, family: str | None = None) -> str:
    """Write `out_dir` for transformers.AutoModelForCausalLM; returns the model_type used."""
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {out} is not empty")
    cfg = load_config_from_checkpoint(ckpt)
    chosen = choose_family(cfg.model, family)
    tensors = hf_state_dict(read_weights(ckpt), cfg, chosen)

    tokenizer = None
    if (ckpt / TOKENIZER_DIR).is_dir():
        from kmodel.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(ckpt / TOKENIZER_DIR)
    config = {"model_type": chosen.model_type, "architectures": [chosen.architecture], **chosen.config_json(cfg)}
    # Without a tokenizer there are no special ids; an implicit pad id would freeze that embedding row.
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if tokenizer is not None else (None, None, None)
    config.update(zip(("bos_token_id", "eos_token_id", "pad_token_id"), special))

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        from kmodel.tokenizer.hf_export import export_hf_tokenizer

        export_hf_tokenizer(tokenizer, out)
    return chosen.model_type


# The families beyond the model-core three live in their own module; importing it registers them.
from kmodel.export import families  # noqa: E402, F401
