"""The recipe: one validated config object, the single source of truth for a run.

A recipe is a YAML file with a top-level `seed` and the sections `model`, `data`, `train`, `kernels`,
`parallel`, `provenance`. Model keys follow Hugging Face's names wherever one exists. `load_config` reads
the file, applies `--set section.key=value` overrides and validates; every error names the key at fault
(unknown keys come with the closest valid name). The resolved config (derived fields such as
`layer_types` filled in) is what runs and checkpoints save, so reloading it gives the same model.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LayerType = Literal["sliding_attention", "full_attention"]
MlpType = Literal["dense", "sparse"]


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the file and key."""


class Section(BaseModel):
    # No NaN or infinity anywhere: `train.lr=.inf` would pass `gt=0` and fail much later, when JSON meets it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RopeScaling(Section):
    """YaRN context extension (Hugging Face's `rope_parameters` / `rope_scaling` keys besides rope_theta).

    Rotary frequencies below `beta_slow` rotations over the original context are divided by `factor`, those
    above `beta_fast` are kept, and a linear ramp blends the band between. cos/sin are multiplied by
    `attention_factor` (default: 0.1 ln(factor) + 1, or the ratio of the `mscale` / `mscale_all_dim` forms).
    With `mscale_all_dim` set, the softmax scale is also multiplied by (0.1 mscale_all_dim ln(factor) + 1)^2
    (DeepSeek-V3's convention)."""

    rope_type: Literal["yarn"] = "yarn"
    factor: float = Field(gt=1, description="context extension ratio")
    original_max_position_embeddings: int = Field(gt=0, description="context length the model was pre-trained at")
    beta_fast: float = Field(32.0, gt=0)
    beta_slow: float = Field(1.0, gt=0)
    mscale: float | None = Field(None, gt=0)
    mscale_all_dim: float | None = Field(None, gt=0)
    attention_factor: float | None = Field(None, gt=0, description="cos/sin multiplier (default from factor)")
    truncate: bool = Field(True, description="round the ramp's ends to whole dims (gpt-oss: false)")


class ModelConfig(Section):
    # --- Hugging Face names -------------------------------------------------------------------
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="dense SwiGLU width")
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int | None = Field(None, gt=0, description="default hidden_size // num_attention_heads")
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    max_position_embeddings: int = Field(4096, gt=0)
    sliding_window: int | None = Field(None, description="keys a sliding layer sees, itself included")
    sliding_window_pattern: str | int | None = Field(
        None, description="'LLLG' (repeats; L = sliding, G = full) or N (every N-th layer full); last layer full"
    )
    layer_types: list[LayerType] | None = None
    num_experts: int = Field(0, ge=0, description="routed experts; 0 makes every layer dense")
    num_experts_per_tok: int = Field(1, gt=0)
    num_shared_experts: int = Field(0, ge=0)
    moe_intermediate_size: int | None = Field(None, gt=0)
    first_k_dense_replace: int = Field(0, ge=0)
    mlp_layer_types: list[MlpType] | None = None
    routed_scaling_factor: float = Field(1.0, gt=0)
    norm_topk_prob: bool = True
    n_group: int = Field(1, gt=0)
    topk_group: int = Field(1, gt=0)
    tie_word_embeddings: bool = False
    initializer_range: float = Field(0.02, gt=0)
    # --- what transformers has no name for ----------------------------------------------------
    rope_layers: Literal["all", "sliding"] = Field(
        "all", description="'sliding': RoPE on sliding layers only, NoPE on full-attention layers"
    )
    norm_placement: Literal["pre", "post", "sandwich"] = Field(
        "pre", description="pre: x + f(norm(x)); post (EXAONE 4.0): x + norm(f(x)); sandwich: x + norm(f(norm(x)))"
    )
    qk_norm: bool = True
    router: Literal["sigmoid", "softmax"] = Field("sigmoid", description="router score function")
    router_bias_update_rate: float = Field(
        1e-3, ge=0, description="aux-loss-free balancing: correction-bias step per update (0 disables)"
    )
    aux_loss_coef: float = Field(0.0, ge=0, description="load-balancing loss weight (0 disables)")
    aux_loss_kind: Literal["sequence", "batch", "global"] = Field(
        "sequence", description="balance loss counted per sequence, per micro-batch, or (global) with expert loads "
        "summed over the data-parallel ranks' micro-batches (one process: as batch)"
    )
    router_z_loss_coef: float = Field(0.0, ge=0)
    num_nextn_predict_layers: int = Field(
        0, ge=0, description="multi-token prediction depth: sequential MTP modules, module k predicts token i + k + 1"
    )
    mtp_loss_coef: float = Field(0.3, ge=0, description="MTP loss weight, split evenly over the depths (DeepSeek-V3)")
    mtp_loss_weights: list[float] | None = Field(
        None, description="one loss weight per MTP depth; when given, replaces mtp_loss_coef's even split"
    )
    logits_z_loss_coef: float = Field(0.0, ge=0, description="z-loss on the output logits")
    # --- multi-head latent attention (DeepSeek-V3 / A.X K1; HF names) -----------------------------
    attention_kind: Literal["gqa", "mla", "differential", "differential_latent"] = Field(
        "gqa",
        description="gqa: grouped-query attention; mla: multi-head latent attention; differential: Motif's grouped "
        "differential attention; differential_latent: Motif-3's differential attention over MLA's projections",
    )
    q_lora_rank: int | None = Field(None, gt=0, description="mla: query compression rank (None: full-rank query)")
    kv_lora_rank: int | None = Field(None, gt=0, description="mla: key/value latent rank (what the KV cache stores)")
    qk_nope_head_dim: int | None = Field(None, gt=0, description="mla: per-head query/key dims without RoPE")
    qk_rope_head_dim: int | None = Field(None, gt=0, description="mla: per-head query dims with RoPE (key part shared)")
    v_head_dim: int | None = Field(None, gt=0, description="mla: per-head value dims")
    post_mlp_norm: bool = Field(False, description="RMSNorm on the MoE output before the residual add (A.X K1)")
    # --- muP-style multipliers (HyperCLOVA X; HF names) -------------------------------------------
    embedding_multiplier: float = Field(1.0, gt=0, description="token embeddings are scaled by this")
    residual_multiplier: float = Field(1.0, gt=0, description="each sublayer's output is scaled by this before the add")
    attention_multiplier: float | None = Field(
        None, gt=0, description="softmax scale of the attention logits (default: query/key head dim ** -0.5)"
    )
    logits_scaling: float = Field(1.0, gt=0, description="output logits are multiplied by this")
    # --- gpt-oss (HF names where transformers has one) -----------------------------------------------
    attention_bias: bool = Field(False, description="biases on the q/k/v/o projections (GQA)")
    attention_sinks: bool = Field(False, description="a learned per-head logit in every softmax denominator (gpt-oss)")
    router_bias: bool = Field(False, description="a learned bias on the router logits (gpt-oss)")
    expert_bias: bool = Field(False, description="biases on the routed experts' gate/up and down projections")
    expert_activation: Literal["swiglu", "clamped_swiglu"] = Field(
        "swiglu",
        description="routed experts: swiglu = silu(gate) * up; clamped_swiglu (gpt-oss) = "
        "gate * sigmoid(swiglu_alpha * gate) * (up + 1) with gate <= swiglu_limit and |up| <= swiglu_limit",
    )
    swiglu_alpha: float | None = Field(None, gt=0, description="clamped_swiglu: sigmoid gain (default 1.702)")
    swiglu_limit: float | None = Field(
        None, gt=0, description="clamped_swiglu: clamp of gate (above) and up (both sides) (default 7.0)"
    )
    # --- RoPE variants ----------------------------------------------------------------------------
    rope_scaling: RopeScaling | None = Field(None, description="YaRN context extension (None: plain RoPE)")
    rope_local_base_freq: float | None = Field(
        None, gt=0, description="RoPE theta of sliding layers, unscaled (Gemma 3's name); None: as full layers"
    )
    norm_weight_plus_one: bool = Field(
        False, description="Gemma-style norms: the weight is stored as w, applied as (1 + w), initialised to 0"
    )
    # --- K-EXAONE 2.0 (vLLM's config names) ---------------------------------------------------------
    sliding_windows: list[int | None] | None = Field(
        None,
        description="one entry per layer: the window of a sliding layer, null for a full layer (sets layer_types; "
        "sliding_window becomes the largest)",
    )
    swiglu_limits: list[float | None] | None = Field(
        None,
        description="one entry per layer: clamp silu(gate) <= limit and |up| <= limit in the layer's SwiGLU (dense "
        "MLP, shared and routed experts); null or 0: no clamp",
    )
    mtp_mlp_type: MlpType | None = Field(None, description="the MTP blocks' feed-forward (default: the last layer's)")
    # --- Motif-2 (Motif's config names) ----------------------------------------------------------------
    num_noise_heads: int | None = Field(
        None,
        gt=0,
        description="differential: noise query heads; the other num_attention_heads are signal heads, "
        "num_attention_heads / num_noise_heads - 1 (grouped_ratio) per noise head",
    )
    attn_rms_norm_eps: float = Field(1e-5, gt=0, description="differential: eps of the RMSNorm over each head's 2 * head_dim")
    mlp_activation: Literal["swiglu", "polynorm"] = Field(
        "swiglu",
        description="dense MLPs and experts: down(act(gate) * up) with act = silu (swiglu) or PolyNorm (Motif; routed "
        "experts get one set of PolyNorm coefficients each, Motif-3's grouped PolyNorm)",
    )
    # --- Motif-3 (Motif's config names) ----------------------------------------------------------------
    polynorm_sigmoid_weight: bool = Field(False, description="polynorm: coefficients are sigmoid(weight) (Motif-3)")
    polynorm_output_scale: float = Field(1.0, gt=0, description="polynorm: output multiplier (Motif-3: 0.5)")
    polynorm_bias_clamp: float | None = Field(
        None, gt=0, description="polynorm: routed experts' bias clamped to [-clamp, clamp] (Motif-3: 0.5)"
    )
    attention_output_gate: bool = Field(
        False, description="differential_latent: attention output times sigmoid(gate_proj(x)), elementwise"
    )
    hc_mult: int = Field(
        1, ge=1, description="manifold-constrained hyper-connections: residual streams per token (1: plain residual)"
    )
    hc_sinkhorn_iters: int = Field(20, ge=1, description="hyper-connections: Sinkhorn-Knopp iterations of H_res")
    hc_eps: float = Field(1e-6, gt=0, description="hyper-connections: eps of the RMS normalisation of the streams")

    @model_validator(mode="after")
    def _resolve_and_check(self) -> "ModelConfig":
        n = self.num_hidden_layers
        if not self.differential_attention and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        self._check_attention_kind()
        self._check_gpt_oss_features()
        self._check_mtp()
        if self.hc_mult > 1 and self.num_nextn_predict_layers:
            raise ValueError(
                "hc_mult > 1 (hyper-connections) with num_nextn_predict_layers: the MTP blocks read one residual "
                "stream and are not built for hyper-connections; set num_nextn_predict_layers: 0 or hc_mult: 1"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.attention_kind == "gqa" and self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.sliding_window is not None and self.sliding_window > self.max_position_embeddings:
            raise ValueError(
                f"sliding_window ({self.sliding_window}) exceeds max_position_embeddings ({self.max_position_embeddings}): "
                "a window longer than the context is full attention; lower it or use full_attention layers"
            )

        self._resolve_sliding_windows()
        derived = _layer_types_from_pattern(self.sliding_window_pattern, n)
        if self.layer_types is None:
            layer_types = derived or ["full_attention"] * n
        else:
            layer_types = list(self.layer_types)
            if derived is not None and derived != layer_types:
                raise ValueError("layer_types and sliding_window_pattern disagree; give one of them")
        if len(layer_types) != n:
            raise ValueError(f"layer_types has {len(layer_types)} entries for num_hidden_layers={n}")
        if "sliding_attention" in layer_types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        object.__setattr__(self, "layer_types", layer_types)
        if self.rope_local_base_freq is not None and "sliding_attention" not in layer_types:
            raise ValueError("rope_local_base_freq is set but there are no sliding_attention layers")

        if self.num_experts == 0:
            mlp_types = ["dense"] * n
            if self.mlp_layer_types is not None and "sparse" in self.mlp_layer_types:
                raise ValueError("mlp_layer_types has sparse layers but num_experts is 0")
        elif self.mlp_layer_types is not None:
            mlp_types = list(self.mlp_layer_types)
        else:
            if self.first_k_dense_replace > n:
                raise ValueError(f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers ({n})")
            mlp_types = ["dense" if i < self.first_k_dense_replace else "sparse" for i in range(n)]
        if len(mlp_types) != n:
            raise ValueError(f"mlp_layer_types has {len(mlp_types)} entries for num_hidden_layers={n}")
        object.__setattr__(self, "mlp_layer_types", mlp_types)
        self._resolve_mtp_and_clamps()

        if self.num_experts:
            if self.moe_intermediate_size is None:
                raise ValueError("moe_intermediate_size is required when num_experts > 0")
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
                )
            if self.num_experts % self.n_group:
                raise ValueError(f"n_group ({self.n_group}) does not divide num_experts ({self.num_experts})")
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
            if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in topk_group "
                    f"({self.topk_group}) groups of {self.num_experts // self.n_group}"
                )
        return self

    def _resolve_sliding_windows(self) -> None:
        windows, n = self.sliding_windows, self.num_hidden_layers
        if windows is None:
            return
        if len(windows) != n:
            raise ValueError(f"sliding_windows has {len(windows)} entries for num_hidden_layers={n}")
        bad = [(i, w) for i, w in enumerate(windows) if w is not None and w <= 0]
        if bad:
            raise ValueError(f"sliding_windows[{bad[0][0]}] is {bad[0][1]}: a window must be positive (null: full layer)")
        types = ["full_attention" if w is None else "sliding_attention" for w in windows]
        if self.layer_types is not None and list(self.layer_types) != types:
            raise ValueError("layer_types and sliding_windows disagree (null windows are the full layers); give one")
        if self.sliding_window_pattern is not None:
            raise ValueError("sliding_window_pattern and sliding_windows both set the layer types; give one")
        sized = [w for w in windows if w is not None]
        largest = max(sized) if sized else None
        if self.sliding_window is not None and self.sliding_window != largest:
            raise ValueError(
                f"sliding_window ({self.sliding_window}) must be the largest of sliding_windows ({largest}) or unset"
            )
        object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "sliding_window", largest)

    def _resolve_mtp_and_clamps(self) -> None:
        n = self.num_hidden_layers
        mtp_type = self.mtp_mlp_type or self.mlp_layer_types[-1]
        if mtp_type == "sparse" and self.num_experts == 0:
            raise ValueError("mtp_mlp_type 'sparse' needs routed experts (num_experts is 0)")
        object.__setattr__(self, "mtp_mlp_type", mtp_type)
        self._check_motif_mlp()
        limits = self.swiglu_limits
        if limits is None:
            return
        if len(limits) != n:
            raise ValueError(f"swiglu_limits has {len(limits)} entries for num_hidden_layers={n}")
        bad = [(i, v) for i, v in enumerate(limits) if v is not None and v < 0]
        if bad:
            raise ValueError(f"swiglu_limits[{bad[0][0]}] is {bad[0][1]}: a clamp must be positive (null or 0: none)")
        if self.expert_activation != "swiglu":
            raise ValueError("swiglu_limits clamp plain SwiGLU; expert_activation 'clamped_swiglu' has its own clamp")

    def window_of(self, layer_idx: int) -> int | None:
        """Keys a query of layer `layer_idx` sees (None: all): its own entry of sliding_windows, else
        sliding_window on sliding layers."""
        if self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_windows[layer_idx] if self.sliding_windows is not None else self.sliding_window

    def swiglu_limit_of(self, layer_idx: int) -> float | None:
        """The SwiGLU clamp of layer `layer_idx` (None: unclamped)."""
        return (self.swiglu_limits[layer_idx] or None) if self.swiglu_limits is not None else None

    def _check_attention_kind(self) -> None:
        mla_keys = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if not self.latent_attention:
            stray = [key for key in mla_keys if getattr(self, key) is not None]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} only apply to attention_kind 'mla' or 'differential_latent' (attention_kind "
                    f"is {self.attention_kind!r})"
                )
        if self.attention_kind != "differential_latent" and self.attention_output_gate:
            raise ValueError(
                f"attention_output_gate only applies to attention_kind 'differential_latent' (attention_kind is "
                f"{self.attention_kind!r})"
            )
        if not self.differential_attention and self.num_noise_heads is not None:
            raise ValueError(
                "num_noise_heads only applies to attention_kind 'differential' or 'differential_latent' "
                f"(attention_kind is {self.attention_kind!r})"
            )
        if self.differential_attention:
            self._check_differential()
        if not self.latent_attention:
            return
        kind = self.attention_kind
        missing = [key for key in mla_keys[1:] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"attention_kind {kind!r} requires {', '.join(missing)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for rotary embeddings")
        if kind == "mla" and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"attention_kind {kind!r} expands its latent to one key/value per query head: num_key_value_heads "
                f"({self.num_key_value_heads}) must equal num_attention_heads ({self.num_attention_heads})"
            )
        if self.qk_norm:
            raise ValueError(f"qk_norm: attention_kind {kind!r} normalises its compressed latents instead; set qk_norm: false")
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.head_dim is not None and self.head_dim != qk_head_dim:
            raise ValueError(
                f"head_dim ({self.head_dim}) must equal qk_nope_head_dim + qk_rope_head_dim ({qk_head_dim}) "
                f"for attention_kind {kind!r}; leave it unset"
            )
        object.__setattr__(self, "head_dim", qk_head_dim)

    def _check_differential(self) -> None:
        heads, noise, kv = self.num_attention_heads, self.num_noise_heads, self.num_key_value_heads
        if noise is None:
            raise ValueError(f"attention_kind {self.attention_kind!r} requires num_noise_heads")
        if noise >= heads or (heads - noise) % noise:
            raise ValueError(
                f"num_noise_heads ({noise}) must divide the signal heads num_attention_heads - num_noise_heads "
                f"({heads - noise}), which must be positive"
            )
        if kv % 2 or noise % (kv // 2):
            raise ValueError(
                f"num_key_value_heads ({kv}) must be even (signal and noise key per pair) and its pairs "
                f"({kv // 2}) must divide num_noise_heads ({noise})"
            )
        if self.qk_norm:
            raise ValueError("qk_norm: differential attention normalises each head's output instead; set qk_norm: false")

    def _check_motif_mlp(self) -> None:
        if self.mlp_activation == "swiglu":
            stray = [key for key in ("polynorm_sigmoid_weight", "polynorm_bias_clamp") if getattr(self, key)]
            stray += ["polynorm_output_scale"] if self.polynorm_output_scale != 1.0 else []
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to mlp_activation 'polynorm'")
            return
        if self.expert_activation != "swiglu":
            raise ValueError(
                "mlp_activation 'polynorm' replaces the experts' activation; expert_activation "
                f"{self.expert_activation!r} cannot be combined with it: set expert_activation: swiglu"
            )
        if self.polynorm_bias_clamp is not None and self.num_experts == 0:
            raise ValueError("polynorm_bias_clamp clamps the routed experts' PolyNorm bias: it needs num_experts > 0")
        if self.swiglu_limits is not None and any(self.swiglu_limits):
            raise ValueError("swiglu_limits clamp SwiGLU; mlp_activation 'polynorm' has no such clamp")

    def _check_gpt_oss_features(self) -> None:
        if self.attention_kind != "gqa":
            stray = [key for key in ("attention_bias", "attention_sinks") if getattr(self, key)]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} only apply to attention_kind 'gqa' (attention_kind is {self.attention_kind!r})"
                )
        if self.num_experts == 0:
            stray = [key for key in ("router_bias", "expert_bias") if getattr(self, key)]
            if self.expert_activation != "swiglu":
                stray.append("expert_activation")
            if stray:
                raise ValueError(f"{', '.join(stray)} need routed experts (num_experts is 0)")
        if self.expert_activation == "swiglu":
            stray = [key for key in ("swiglu_alpha", "swiglu_limit") if getattr(self, key) is not None]
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to expert_activation 'clamped_swiglu'")
        else:  # gpt-oss's published values
            object.__setattr__(self, "swiglu_alpha", 1.702 if self.swiglu_alpha is None else self.swiglu_alpha)
            object.__setattr__(self, "swiglu_limit", 7.0 if self.swiglu_limit is None else self.swiglu_limit)

    def _check_mtp(self) -> None:
        weights = self.mtp_loss_weights
        if weights is None:
            return
        if len(weights) != self.num_nextn_predict_layers:
            raise ValueError(
                f"mtp_loss_weights has {len(weights)} entries for num_nextn_predict_layers="
                f"{self.num_nextn_predict_layers}; give one weight per depth"
            )
        if any(w < 0 for w in weights):
            raise ValueError(f"mtp_loss_weights must be non-negative, got {weights}")

    @property
    def mtp_depth_weights(self) -> list[float]:
        """The loss weight of each MTP depth: mtp_loss_weights, else mtp_loss_coef / depth for every depth
        (DeepSeek-V3's lambda / D)."""
        if self.mtp_loss_weights is not None:
            return list(self.mtp_loss_weights)
        depth = self.num_nextn_predict_layers
        return [self.mtp_loss_coef / depth] * depth

    @property
    def q_heads_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_dim(self) -> int:
        """Dims per head that RoPE rotates: all of head_dim for GQA, the decoupled RoPE part for MLA."""
        return self.qk_rope_head_dim if self.latent_attention else self.head_dim

    @property
    def differential_attention(self) -> bool:
        """Signal and noise maps subtracted (Motif's differential, differential_latent)."""
        return self.attention_kind in ("differential", "differential_latent")

    @property
    def latent_attention(self) -> bool:
        """Keys and values expanded from MLA's low-rank latent (mla, differential_latent)."""
        return self.attention_kind in ("mla", "differential_latent")

    @property
    def kv_cache_values_per_position(self) -> int:
        """Numbers one layer's generation cache keeps per kept position: the compressed latent plus the
        shared RoPE key for MLA, full keys and values for GQA."""
        if self.latent_attention:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.head_dim


def _layer_types_from_pattern(pattern: str | int | None, n: int) -> list[str] | None:
    if pattern is None:
        return None
    if isinstance(pattern, int):
        if pattern <= 0:
            raise ValueError(f"sliding_window_pattern must be positive, got {pattern}")
        pattern = "L" * (pattern - 1) + "G"
    if not pattern or set(pattern) - {"L", "G"}:
        raise ValueError(f"sliding_window_pattern {pattern!r} must be a string of 'L' and 'G' or an integer")
    types = ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention" for i in range(n)]
    types[-1] = "full_attention"
    return types


class DataSource(Section):
    path: str = Field(description="local file or glob (.jsonl, .json, .parquet, .txt), or a Hub dataset name")
    weight: float = Field(1.0, gt=0, description="share of training tokens drawn from this source")
    name: str | None = None
    text_key: str = "text"


class DataConfig(Section):
    sources: list[DataSource] = Field(
        default_factory=list,
        description="what to train on; with `prepared`, the prepared sources (by name) and their weights "
        "(default: all of them, at the weights they were prepared with)",
    )
    prepared: str | None = Field(None, description="directory written by `kmodel data prepare` to train from")
    heldout: list[str] = Field(default_factory=list, description="files for the held-out evaluation")
    tokenizer: str = Field("shipped", description="tokenizer directory, or 'shipped' for kmodel's Korean tokenizer")
    seq_len: int = Field(256, gt=1)
    document_masking: bool = Field(False, description="packed documents never attend across each other")

    @model_validator(mode="after")
    def _check_sources(self) -> "DataConfig":
        if not self.sources and self.prepared is None:
            raise ValueError("data.sources is empty: name at least one source, or data.prepared")
        return self


class WandbConfig(Section):
    enabled: bool = False
    project: str = "kmodel"
    mode: Literal["offline", "online", "disabled"] = "offline"


class TrainConfig(Section):
    micro_batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    max_steps: int = Field(100, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")
    weight_decay: float = Field(0.1, ge=0)
    decay_embeddings: bool = Field(False, description="apply weight decay to embeddings and the LM head")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon on hidden weight matrices, AdamW on the rest (kmodel.train.muon)"
    )
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_nesterov: bool = True
    muon_ns_steps: int = Field(5, gt=0, description="Newton-Schulz iterations per Muon update")
    muon_params: list[str] = Field(
        default_factory=list, description="glob patterns of matrices moved to Muon (e.g. '*.mlp.gate.weight')"
    )
    adamw_params: list[str] = Field(
        default_factory=list, description="glob patterns of matrices kept on AdamW under optimizer muon"
    )
    qk_clip_tau: float | None = Field(
        None, gt=0, description="MuonClip: cap each head's max attention logit at tau (Kimi K2: 100); None: off"
    )
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm (0 disables)")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    activation_checkpointing: bool = False
    checkpoint_every: int = Field(10, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    async_checkpoint: bool = Field(
        True, description="write checkpoints on a background thread from a snapshot while training continues"
    )
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0, description="held-out eval every N steps (0: only at the end)")
    eval_batches: int = Field(8, gt=0)
    max_bad_steps: int = Field(5, gt=0, description="consecutive non-finite steps before the run stops")
    hang_timeout_s: float = Field(
        1200, gt=0, description="a step (eval and checkpoint included) longer than this is a hang: every rank dumps "
        "its Python stacks to DIR/hang/ and exits non-zero, so the job restarts from its newest checkpoint; "
        "collectives time out 300 s later (kmodel.parallel.entry), a backstop behind the dumps",
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="after")
    def _check_schedule(self) -> "TrainConfig":
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps}): the learning rate would "
                f"never reach lr; lower warmup_steps (e.g. --set train.warmup_steps={self.max_steps // 10})"
            )
        return self


class KernelsConfig(Section):
    attention: Literal["torch", "triton", "auto"] = "auto"
    moe: Literal["torch", "triton", "auto"] = "auto"
    norm: Literal["torch", "triton", "auto"] = "auto"
    loss: Literal["torch", "triton", "auto"] = "auto"


class ParallelConfig(Section):
    """How a run is spread over processes: world = pipeline x data x context parallel sizes. Rank r is
    context-parallel rank r % CP (consecutive ranks share a sequence), data-parallel rank (r // CP) % DP and
    pipeline stage r // (CP x DP) (stages outermost, so they may span nodes). Within one stage, expert-parallel
    groups of `expert_parallel_size` consecutive ranks each hold all experts once (they may span CP ranks)."""

    backend: Literal["none", "deepspeed"] = Field("none", description="none: one process; deepspeed: ZeRO engine")
    world_size: int = Field(1, gt=0, description="processes (GPUs) in the run")
    expert_parallel_size: int = Field(1, gt=0, description="ranks the routed experts are sharded over")
    context_parallel_size: int = Field(1, gt=0, description="ranks each sequence is split over (zigzag chunks)")
    pipeline_parallel_size: int = Field(1, gt=0, description="pipeline stages the layers are split over")
    pipeline_layers: list[int] | None = Field(
        None, description="decoder layers per model chunk (stages x virtual stages entries, in order); None: the "
        "cost model's split (kmodel.parallel.pipeline_split)"
    )
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b"] = Field(
        "1f1b", description="1f1b: one chunk per stage; interleaved_1f1b: pipeline_virtual_stages chunks per stage"
    )
    pipeline_virtual_stages: int = Field(1, gt=0, description="model chunks per stage (interleaved_1f1b only)")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="1: optimizer states, 2: + gradients, 3: + weights sharded")
    offload_optimizer: bool = Field(False, description="optimizer states in CPU memory (ZeRO-Offload, stage >= 1)")
    offload_params: bool = Field(False, description="weights in CPU memory (ZeRO-Infinity, stage 3 only)")
    global_batch_size: int | None = Field(
        None, gt=0, description="sequences per optimizer step; must equal micro_batch_size x grad_accum_steps x world_size"
    )

    @property
    def data_parallel_size(self) -> int:
        """Ranks that read different rows: world / (context x pipeline parallel)."""
        return self.world_size // (self.context_parallel_size * self.pipeline_parallel_size)

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        cp, pp = self.context_parallel_size, self.pipeline_parallel_size
        if self.world_size % (cp * pp):
            raise ValueError(
                f"context_parallel_size ({cp}) x pipeline_parallel_size ({pp}) = {cp * pp} does not divide "
                f"world_size ({self.world_size})"
            )
        if pp > 1 and (self.world_size // pp) % self.expert_parallel_size:
            raise ValueError(
                f"expert_parallel_size ({self.expert_parallel_size}) does not divide the {self.world_size // pp} ranks "
                f"of one pipeline stage (world_size {self.world_size} / pipeline_parallel_size {pp})"
            )
        distributed = self.world_size > 1 or self.expert_parallel_size > 1 or self.zero_stage > 0
        if distributed and self.backend == "none":
            raise ValueError(
                f"world_size={self.world_size}, expert_parallel_size={self.expert_parallel_size}, "
                f"zero_stage={self.zero_stage} need backend: deepspeed (backend none is one process)"
            )
        if self.world_size % self.expert_parallel_size:
            raise ValueError(
                f"expert_parallel_size ({self.expert_parallel_size}) does not divide world_size ({self.world_size})"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (DeepSpeed offloads weights only in ZeRO-3), got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.zero_stage == 0 and self.expert_parallel_size > 1:
            raise ValueError(
                "expert_parallel_size > 1 needs zero_stage 1 or 2: the experts are optimised outside DeepSpeed and "
                "their gradient norm joins ZeRO-1/2's clipping"
            )
        if self.zero_stage == 3 and self.expert_parallel_size > 1:
            raise ValueError(
                "zero_stage 3 with expert_parallel_size > 1 is refused: ZeRO-3 would partition the expert shards "
                "across ranks that hold different experts; use zero_stage 1 or 2 with expert parallelism"
            )
        return self


class ProvenanceConfig(Section):
    ledger: bool = Field(True, description="write the hash-chained ledger.jsonl")
    deterministic: bool = Field(True, description="torch deterministic algorithms (bit-exact CPU replay)")


class Config(Section):
    name: str = "run"
    seed: int = 0
    model: ModelConfig
    data: DataConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    provenance: ProvenanceConfig = Field(default_factory=ProvenanceConfig)

    @model_validator(mode="after")
    def _check_parallel_against_model(self) -> "Config":
        if self.data is not None and self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings}): positions beyond the context were never meant to be trained; "
                "lower data.seq_len or raise max_position_embeddings (with rope_scaling for an extension)"
            )
        p, ep = self.parallel, self.parallel.expert_parallel_size
        if ep > 1 and self.model.num_experts % ep:
            raise ValueError(
                f"parallel.expert_parallel_size ({ep}) does not divide model.num_experts ({self.model.num_experts})"
            )
        if self.data is not None and self.data.seq_len % (2 * p.context_parallel_size) and p.context_parallel_size > 1:
            raise ValueError(
                f"parallel.context_parallel_size ({p.context_parallel_size}) splits each sequence into "
                f"{2 * p.context_parallel_size} zigzag chunks, which must divide data.seq_len ({self.data.seq_len}); "
                f"use a seq_len that is a multiple of {2 * p.context_parallel_size}"
            )
        per_rank, dp = self.train.micro_batch_size * self.train.grad_accum_steps, p.data_parallel_size
        if p.global_batch_size is not None and p.global_batch_size != per_rank * dp:
            unit = self.train.micro_batch_size * dp
            fix = (
                f"set train.grad_accum_steps to {p.global_batch_size // unit}"
                if p.global_batch_size % unit == 0
                else f"it is not divisible by micro_batch_size x data-parallel size = {unit}"
            )
            raise ValueError(
                f"parallel.global_batch_size ({p.global_batch_size}) != train.micro_batch_size "
                f"({self.train.micro_batch_size}) x train.grad_accum_steps ({self.train.grad_accum_steps}) x "
                f"data-parallel size ({dp} = world_size {p.world_size} / (context {p.context_parallel_size} x "
                f"pipeline {p.pipeline_parallel_size})); {fix}"
            )
        return self

    @model_validator(mode="after")
    def _check_optimizer(self) -> "Config":
        if self.train.optimizer == "muon" and self.parallel.offload_optimizer:
            raise ValueError(
                "train.optimizer muon with parallel.offload_optimizer is refused: ZeRO-Offload runs DeepSpeed's CPU "
                "Adam, which has no Muon; set parallel.offload_optimizer=false or train.optimizer=adamw"
            )
        if self.train.qk_clip_tau is not None and self.model.attention_kind in ("differential", "differential_latent"):
            raise ValueError(
                "train.qk_clip_tau: MuonClip caps the logits of softmax heads (attention_kind gqa or mla); "
                "differential attention subtracts two softmaxes and is not clipped; unset train.qk_clip_tau"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def fingerprint(self) -> str:
        """sha256 of the resolved config (canonical JSON)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# --- loading --------------------------------------------------------------------------------------


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (so 3, 1e-3, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {key!r} is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            f"--set {assignment!r}: the value {raw!r} is not valid YAML ({problem}); quote a string, close brackets"
        ) from None


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at the location of an error, for suggestions."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = [a for a in candidates if issubclass(a, BaseModel)]
        if not nested:
            # lists of sections, e.g. data.sources
            inner = [t for a in getattr(annotation, "__args__", ()) for t in getattr(a, "__args__", (a,))]
            nested = [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _explain(error: ValidationError, source: str) -> ConfigError:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _field_names(Config, loc), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {key!r}{hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message}")
    return ConfigError(f"invalid recipe {source}:\n  " + "\n  ".join(lines))


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise _explain(error, source) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply `section.key=value` overrides, validate and resolve."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a directory; give the YAML file (e.g. {path / 'recipe.yaml'})")
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(tree).__name__}")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return config_from_dict(tree, str(path))
