"""Every national model's architecture against transformers' own implementation.

Random small configs of each family -> kmodel checkpoint -> `export_hf` -> transformers' class: logits must
agree within 1e-4 relative (fp32) and gradients on parameters of every kind. All norm weights are
randomised first so that a norm exported under the wrong name (or applied in the wrong place) shows.
Also: MLA's compressed generation cache reproduces the uncached forward, and config errors name the key.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from cached_decoding import cached_logits

from kmodel.checkpoint import save_checkpoint
from kmodel.config import ConfigError, config_from_dict, load_config
from kmodel.export.hf import FAMILIES, ExportError, choose_family, export_hf
from kmodel.model import build_model

transformers = pytest.importorskip("transformers")


def base_model(rng: random.Random, **overrides) -> dict:
    heads = rng.choice([2, 4])
    model = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": rng.choice([2, 3]),
        "num_attention_heads": heads,
        "num_key_value_heads": rng.choice([h for h in (1, 2, 4) if heads % h == 0]),
        "rope_theta": rng.choice([10000.0, 500000.0]),
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128,
        "initializer_range": 0.2,  # large weights so mistakes show in the logits
    }
    model.update(overrides)
    return model


def routed_experts(rng: random.Random, *, grouped: bool) -> dict:
    experts = rng.choice([4, 8])
    n_group = rng.choice([2, 4] if grouped and experts == 8 else [2] if grouped else [1])
    topk_group = rng.choice(range(1, n_group + 1))
    return {
        "num_experts": experts,
        "num_experts_per_tok": rng.choice(range(1, topk_group * (experts // n_group) + 1)),
        "moe_intermediate_size": 24,
        "n_group": n_group,
        "topk_group": topk_group,
        "norm_topk_prob": rng.choice([True, False]),
    }


def latent_attention(rng: random.Random, *, low_rank_query: bool) -> dict:
    heads = rng.choice([2, 4])
    return {
        "attention_kind": "mla",
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "qk_norm": False,
        "q_lora_rank": rng.choice([12, 24]) if low_rank_query else None,
        "kv_lora_rank": rng.choice([8, 16]),
        "qk_nope_head_dim": rng.choice([6, 8]),
        "qk_rope_head_dim": rng.choice([4, 8]),
        "v_head_dim": rng.choice([6, 12]),
    }


def qwen3_moe(rng: random.Random) -> dict:
    layers = rng.choice([2, 3])
    dense = sorted(rng.sample(range(layers), rng.choice([0, 1])))
    return base_model(
        rng,
        num_hidden_layers=layers,
        head_dim=rng.choice([8, 16]),
        qk_norm=True,
        router="softmax",
        num_shared_experts=0,
        mlp_layer_types=["dense" if i in dense else "sparse" for i in range(layers)],
        **routed_experts(rng, grouped=False),
    )


def deepseek_v3(rng: random.Random, *, low_rank_query: bool = True) -> dict:
    layers = rng.choice([2, 3])
    return base_model(
        rng,
        num_hidden_layers=layers,
        first_k_dense_replace=rng.choice([0, 1]),
        num_shared_experts=rng.choice([1, 2]),
        routed_scaling_factor=rng.choice([1.0, 2.5]),
        num_nextn_predict_layers=rng.choice([0, 1]),
        **routed_experts(rng, grouped=True),
        **latent_attention(rng, low_rank_query=low_rank_query),
    )


def deepseek_v3_full_rank_query(rng: random.Random) -> dict:
    return deepseek_v3(rng, low_rank_query=False)


def axk1(rng: random.Random) -> dict:
    layers = rng.choice([2, 3])
    return base_model(
        rng,
        num_hidden_layers=layers,
        mlp_layer_types=[rng.choice(["dense", "sparse"]) for _ in range(layers - 1)] + ["sparse"],
        num_shared_experts=1,
        routed_scaling_factor=2.5,
        post_mlp_norm=True,
        **routed_experts(rng, grouped=True),
        **latent_attention(rng, low_rank_query=True),
    )


def hyperclovax(rng: random.Random) -> dict:
    return base_model(
        rng,
        qk_norm=False,
        norm_placement="sandwich",
        embedding_multiplier=rng.choice([2.0, 3.0]),
        residual_multiplier=rng.choice([0.5, 0.7]),
        attention_multiplier=rng.choice([None, 0.0625]),
        logits_scaling=rng.choice([0.25, 0.5]),
    )


def yarn(**extra) -> dict:
    """A YaRN setting whose ramp falls inside the tiny head dims, so every part of it is exercised."""
    return {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 4.0,
            "beta_slow": 0.5, **extra}


def deepseek_v3_yarn(rng: random.Random) -> dict:
    # mscale != mscale_all_dim: both the cos/sin factor and the softmax rescale differ from 1
    return deepseek_v3(rng) | {"rope_scaling": yarn(mscale=0.707, mscale_all_dim=1.0)}


def gpt_oss(rng: random.Random) -> dict:
    experts = rng.choice([4, 8])
    return base_model(
        rng,
        num_hidden_layers=rng.choice([2, 4]),
        head_dim=rng.choice([8, 16]),
        qk_norm=False,
        sliding_window=rng.choice([3, 5]),
        sliding_window_pattern="LG",
        rope_scaling=yarn(truncate=rng.choice([True, False])),
        num_experts=experts,
        num_experts_per_tok=rng.choice([1, 2, 4]),
        moe_intermediate_size=24,
        router="softmax",
        norm_topk_prob=True,
        attention_bias=True,
        attention_sinks=True,
        router_bias=True,
        expert_bias=True,
        expert_activation="clamped_swiglu",
        swiglu_alpha=rng.choice([1.702, 1.2]),
        swiglu_limit=rng.choice([0.5, 1.0]),  # small enough that the clamps bite
    )


FAMILY_CASES = {
    # case: (family, config maker, transformers class, gradient-checked kmodel parameters)
    "qwen3_moe": ("qwen3_moe", qwen3_moe, "Qwen3MoeForCausalLM",
                  ["embed_tokens.weight", "layers.0.self_attn.k_norm.weight", "layers.1.mlp_in_norm.weight"]),
    "deepseek_v3": ("deepseek_v3", deepseek_v3, "DeepseekV3ForCausalLM",
                    ["embed_tokens.weight", "layers.0.self_attn.kv_b_proj.weight", "layers.0.self_attn.q_b_proj.weight",
                     "layers.1.self_attn.kv_a_layernorm.weight", "layers.1.mlp.gate.weight"]),
    "deepseek_v3-full-rank-query": ("deepseek_v3", deepseek_v3_full_rank_query, "DeepseekV3ForCausalLM",
                                    ["layers.0.self_attn.q_proj.weight", "layers.1.self_attn.o_proj.weight"]),
    "axk1": ("axk1", axk1, "AXK1ForCausalLM",
             ["layers.0.self_attn.q_a_layernorm.weight", "layers.0.self_attn.kv_a_proj_with_mqa.weight",
              "layers.1.mlp.post_mlp_norm.weight", "layers.1.mlp.experts.down_proj"]),
    "deepseek_v3-yarn": ("deepseek_v3", deepseek_v3_yarn, "DeepseekV3ForCausalLM",
                         ["layers.0.self_attn.kv_a_proj_with_mqa.weight", "layers.1.self_attn.q_b_proj.weight"]),
    "gpt_oss": ("gpt_oss", gpt_oss, "GptOssForCausalLM",
                ["layers.0.self_attn.sinks", "layers.0.self_attn.q_proj.bias", "layers.1.mlp.gate.bias",
                 "layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.experts.gate_up_proj_bias",
                 "layers.0.mlp.experts.down_proj", "layers.0.mlp.experts.down_proj_bias", "layers.1.attn_in_norm.weight"]),
    "hyperclovax": ("hyperclovax", hyperclovax, "HyperCLOVAXForCausalLM",
                    ["embed_tokens.weight", "layers.0.attn_out_norm.weight", "layers.1.mlp_out_norm.weight",
                     "layers.1.self_attn.v_proj.weight"]),
}


def build(model_section: dict, seed: int):
    cfg = config_from_dict({"seed": seed, "model": model_section, "kernels": {"attention": "torch"}})
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias") or name.endswith("sinks"):  # zero at init: randomise so they count
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        # Non-zero router biases so a wrong bias convention would change the selection.
        for moe in model.moe_layers().values():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.05, generator=generator)
    return cfg, model


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_logits_and_gradients_match_transformers(case, seed, tmp_path):
    family, make, class_name, checked = FAMILY_CASES[case]
    cfg, model = build(make(random.Random(f"{case}-{seed}")), seed)
    save_checkpoint(tmp_path / "ckpt", model, cfg)
    assert export_hf(tmp_path / "ckpt", tmp_path / "hf", family=family, dtype="float32") == family
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    )
    assert type(reference).__name__ == class_name

    # Every exported tensor arrived unchanged, and transformers has no weight the export left out.
    theirs = reference.state_dict()
    rename, transform = FAMILIES[family].rename, FAMILIES[family].transform
    exported = {}
    for name, tensor in model.state_dict().items():
        hf_name = rename(name, cfg.model)
        if hf_name is not None and not name.startswith("mtp."):  # MTP depths: test_mtp_depths_* below
            assert torch.equal(theirs[hf_name], transform(name, tensor, cfg.model)), name
            exported[name] = hf_name
    assert {n for n, _ in reference.named_parameters()} <= set(exported.values())

    ids = torch.randint(0, cfg.model.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed))
    model.eval()
    ours, ref = model(ids).logits, reference(ids).logits
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"{family}: max relative logit error {rel:.2e}"

    labels = torch.roll(ids, -1, dims=1)
    torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten()).backward()
    torch.nn.functional.cross_entropy(reference(ids).logits.flatten(0, 1), labels.flatten()).backward()
    for name in checked:
        g_ours = model.get_parameter(name).grad
        g_ref = reference.get_parameter(exported[name]).grad
        assert g_ours is not None and g_ours.abs().max() > 0, name
        g_ours = transform(name, g_ours, cfg.model)
        assert (g_ours - g_ref).abs().max() <= 1e-4 * g_ref.abs().max() + 1e-7, name


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("low_rank_query", [True, False])
def test_mla_latent_cache_generation_matches_uncached_forward(window, low_rank_query):
    rng = random.Random(f"mla-cache-{window}-{low_rank_query}")
    section = base_model(rng, num_hidden_layers=2, **latent_attention(rng, low_rank_query=low_rank_query))
    if window is not None:  # a sliding layer then a global one, as VAETKI interleaves them
        section.update(sliding_window=window, layer_types=["sliding_attention", "full_attention"])
    cfg, model = build(section, 7)
    model.eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cached, cache = cached_logits(model, ids, prompt=5)
    assert (cached - full).abs().max() <= 1e-5 * full.abs().max()
    # The cache holds the compressed latent and the shared RoPE key, not per-head keys and values.
    m = cfg.model
    for layer_cache, layer_type in zip(cache, m.layer_types):
        kept = window - 1 if layer_type == "sliding_attention" else ids.shape[1]
        assert layer_cache.keys.shape == (2, kept, m.kv_lora_rank)
        assert layer_cache.values.shape == (2, kept, m.qk_rope_head_dim)
    assert m.kv_cache_values_per_position == m.kv_lora_rank + m.qk_rope_head_dim


def test_post_mlp_norm_and_mup_multipliers_change_the_output():
    """The extras are live in kmodel itself (the parity tests alone would pass if both sides ignored them)."""
    rng = random.Random("extras")
    section = base_model(rng, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                         sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    _, plain = build(section, 0)
    baseline = plain.eval()(ids).logits
    for key, value in [("post_mlp_norm", True), ("embedding_multiplier", 2.0), ("residual_multiplier", 0.5),
                       ("attention_multiplier", 0.01), ("logits_scaling", 0.5), ("attention_bias", True),
                       ("attention_sinks", True), ("router_bias", True), ("expert_bias", True),
                       ("expert_activation", "clamped_swiglu"), ("rope_scaling", yarn()),
                       ("rope_local_base_freq", 100.0), ("norm_weight_plus_one", True)]:
        _, changed = build({**section, key: value}, 0)
        assert not torch.allclose(changed.eval()(ids).logits, baseline), key


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention_kind": "mla", "kv_lora_rank": 8}, "requires qk_nope_head_dim, qk_rope_head_dim, v_head_dim"),
        ({"kv_lora_rank": 8}, "kv_lora_rank only apply to attention_kind 'mla'"),
        ({"attention_kind": "mla", "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
          "qk_norm": True, "num_key_value_heads": 4}, "qk_norm"),
        ({"attention_kind": "mla", "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
          "qk_norm": False, "num_key_value_heads": 2}, "num_key_value_heads (2) must equal num_attention_heads (4)"),
        ({"attention_kind": "mla", "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 3, "v_head_dim": 8,
          "qk_norm": False, "num_key_value_heads": 4}, "qk_rope_head_dim (3) must be even"),
    ],
)
def test_bad_latent_attention_config_names_the_key(overrides, message):
    check_config_error(overrides, message)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention_kind": "mla", "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
          "qk_norm": False, "attention_sinks": True}, "attention_sinks only apply to attention_kind 'gqa'"),
        ({"expert_bias": True}, "expert_bias need routed experts"),
        ({"num_experts": 4, "moe_intermediate_size": 8, "swiglu_limit": 5.0},
         "swiglu_limit only apply to expert_activation 'clamped_swiglu'"),
        ({"rope_local_base_freq": 100.0}, "rope_local_base_freq is set but there are no sliding_attention layers"),
        ({"rope_scaling": {"factor": 4.0}}, "rope_scaling.original_max_position_embeddings"),
        ({"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 16, "betafast": 8}},
         "unknown key 'model.rope_scaling.betafast'; did you mean 'beta_fast'"),
    ],
)
def test_bad_gpt_oss_vaetki_or_yarn_config_names_the_key(overrides, message):
    check_config_error(overrides, message)


def check_config_error(overrides: dict, message: str) -> None:
    section = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4, **overrides}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"model": section})


def test_families_refuse_what_they_cannot_express():
    rng = random.Random("refuse")
    ds = config_from_dict({"model": deepseek_v3(rng)}).model
    with pytest.raises(ExportError, match="attention_kind 'mla'"):
        choose_family(ds, "exaone_moe")
    with pytest.raises(ExportError, match="post_mlp_norm off"):
        choose_family(ds, "axk1")
    oss = config_from_dict({"model": gpt_oss(rng)}).model
    with pytest.raises(ExportError, match="attention_sinks"):
        choose_family(oss, "qwen3_moe")
    with pytest.raises(ExportError, match="router_bias off"):
        choose_family(oss.model_copy(update={"router_bias": False}), "gpt_oss")
    assert choose_family(oss).model_type == "gpt_oss"
    with pytest.raises(ExportError, match="norm_weight_plus_one"):
        choose_family(config_from_dict({"model": vaetki(rng)}).model)  # VAETKI has no transformers class
    hcx = config_from_dict({"model": hyperclovax(rng) | {"logits_scaling": 2.0}}).model
    with pytest.raises(ExportError, match="logits_scaling"):
        choose_family(hcx, "exaone4")
    assert choose_family(hcx).model_type == "hyperclovax"


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize(
    "recipe, family",
    [("deepseek-v3-671b-a37b.yaml", "deepseek_v3"), ("ax-k1-519b-a33b.yaml", "axk1"),
     ("qwen3-30b-a3b.yaml", "qwen3_moe"), ("tiny/deepseek-v3.yaml", "deepseek_v3"), ("tiny/ax-k1.yaml", "axk1"),
     ("tiny/qwen3-moe.yaml", "qwen3_moe"), ("tiny/hyperclova-x.yaml", "hyperclovax"),
     ("gpt-oss-20b.yaml", "gpt_oss"), ("tiny/gpt-oss.yaml", "gpt_oss"),
     ("hyperclovax-seed-think-14b.yaml", "hyperclovax"),
     ("vaetki-112b-a10b.yaml", None), ("tiny/vaetki.yaml", None)],
)
def test_recipes_resolve_to_their_transformers_family(recipe, family):
    """family None: no transformers class can express the recipe (VAETKI), and the export says so."""
    cfg = load_config(RECIPES / recipe)
    if family is None:
        with pytest.raises(ExportError, match="no transformers class"):
            choose_family(cfg.model)
    else:
        assert choose_family(cfg.model).model_type == family
    if recipe.startswith("tiny/"):  # small enough to build and train a step here
        model = build_model(cfg)
        ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        out = model(ids, labels=torch.roll(ids, -1, dims=1))
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("mtp."))


# --- VAETKI: no transformers class; checked against an independent float64 re-implementation -----------


def vaetki(rng: random.Random) -> dict:
    """MLA in sliding and global layers with their own RoPE theta, Peri-LN sandwich norms applying (1 + w),
    a dense first layer, then sigmoid-routed MoE with a shared expert."""
    return base_model(
        rng,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=rng.choice([3, 4]),
        rope_theta=10000.0,
        rope_local_base_freq=rng.choice([100.0, 1000.0]),
        norm_placement="sandwich",
        norm_weight_plus_one=True,
        first_k_dense_replace=1,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        moe_intermediate_size=24,
        routed_scaling_factor=rng.choice([1.0, 2.5]),
        norm_topk_prob=rng.choice([True, False]),
        **latent_attention(rng, low_rank_query=True),
    )


def vaetki_reference_logits(w: dict[str, torch.Tensor], m, ids: torch.Tensor) -> torch.Tensor:
    """Plain float64 tensor math over the weights dict (one sequence): written from the architecture's
    description, sharing no code with kmodel.model."""
    seq = ids.shape[0]
    pos = torch.arange(seq, dtype=torch.float64)

    def norm(x, name):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.rms_norm_eps) * (1 + w[name])

    def rotate(x, theta):  # x (seq, heads, d): pairs (i, i + d/2) turn by pos * theta^(-2i/d)
        d = x.shape[-1]
        angle = pos[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def swiglu(x, gate, up, down):
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T

    def attention(x, p, sliding):
        heads, nope, rope_d, v_d = m.num_attention_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        theta = m.rope_local_base_freq if sliding else m.rope_theta
        q = (norm(x @ w[p + "q_a_proj.weight"].T, p + "q_a_layernorm.weight") @ w[p + "q_b_proj.weight"].T)
        q = q.view(seq, heads, nope + rope_d)
        compressed = x @ w[p + "kv_a_proj_with_mqa.weight"].T
        latent = norm(compressed[:, : m.kv_lora_rank], p + "kv_a_layernorm.weight")
        k_rope = rotate(compressed[:, None, m.kv_lora_rank :], theta)  # one key part shared by all heads
        kv = (latent @ w[p + "kv_b_proj.weight"].T).view(seq, heads, nope + v_d)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        scores = torch.einsum("qhd,khd->hqk", q[..., :nope], k_nope)
        scores = scores + torch.einsum("qhd,kd->hqk", rotate(q[..., nope:], theta), k_rope[:, 0])
        gap = pos[:, None] - pos[None, :]
        visible = (gap >= 0) & ((gap < m.sliding_window) if sliding else True)
        scores = (scores / math.sqrt(nope + rope_d)).masked_fill(~visible, float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, heads * v_d)
        return out @ w[p + "o_proj.weight"].T

    def moe(x, p):
        scores = torch.sigmoid(x @ w[p + "gate.weight"].T)
        chosen = (scores + w[p + "gate.e_score_correction_bias"]).topk(m.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, chosen)
        if m.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * m.routed_scaling_factor
        inter = m.moe_intermediate_size
        out = swiglu(x, w[p + "shared_experts.gate_proj.weight"], w[p + "shared_experts.up_proj.weight"],
                     w[p + "shared_experts.down_proj.weight"])
        for t in range(seq):
            for slot in range(m.num_experts_per_tok):
                e = int(chosen[t, slot])
                gate_up = w[p + "experts.gate_up_proj"][e]
                y = swiglu(x[t], gate_up[:inter], gate_up[inter:], w[p + "experts.down_proj"][e])
                out[t] = out[t] + weights[t, slot] * y
        return out

    x = w["embed_tokens.weight"][ids]
    for i, kind in enumerate(m.layer_types):
        p = f"layers.{i}."
        h = attention(norm(x, p + "attn_in_norm.weight"), p + "self_attn.", kind == "sliding_attention")
        x = x + norm(h, p + "attn_out_norm.weight")
        h = norm(x, p + "mlp_in_norm.weight")
        if m.mlp_layer_types[i] == "sparse":
            h = moe(h, p + "mlp.")
        else:
            h = swiglu(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
        x = x + norm(h, p + "mlp_out_norm.weight")
    return norm(x, "norm.weight") @ w["lm_head.weight"].T


@pytest.mark.parametrize("seed", [0, 1])
def test_vaetki_matches_independent_float64_reimplementation(seed):
    cfg, model = build(vaetki(random.Random(f"vaetki-{seed}")), seed)
    model.double().eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = model(ids).logits
    assert ours.dtype == torch.float64
    weights = {name: t.detach() for name, t in model.state_dict().items()}
    for row in range(ids.shape[0]):
        ref = vaetki_reference_logits(weights, cfg.model, ids[row])
        rel = (ours[row] - ref).abs().max() / ref.abs().max()
        assert rel <= 1e-10, f"max relative logit error {rel:.2e}"


def test_plus_one_norms_start_at_zero_and_equal_plain_norms_at_init():
    rng = random.Random("plus-one")
    section = base_model(rng, num_hidden_layers=2, norm_placement="sandwich", qk_norm=True)
    plain = build_model(config_from_dict({"seed": 3, "model": section}))
    shifted = build_model(config_from_dict({"seed": 3, "model": section | {"norm_weight_plus_one": True}}))
    norms = [name for name, _ in shifted.named_parameters() if name.endswith("norm.weight")]
    assert len(norms) == 2 * 6 + 1  # four sandwich norms + q/k norms per layer, and the final norm
    assert all(torch.count_nonzero(shifted.get_parameter(name)) == 0 for name in norms)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted.eval()(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)


# --- MTP depths through the export ---------------------------------------------------------------------


def kmodel_depth_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """[main hidden before the final norm, depth 1 output, depth 2 output, ...] (un-normalised, kmodel's chain)."""
    positions = torch.arange(ids.shape[1])
    _, h, _ = model.backbone(ids, positions)
    states = [h]
    for k, depth in enumerate(model.mtp, start=1):
        n = ids.shape[1] - k
        h, _ = depth(h[:, :n], model.embed(ids[:, k:]), model.mtp_rope(positions[:n]), positions[:n])
        states.append(h)
    return states


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_depths_exported_to_deepseek_v3_are_read_back_by_transformers(depth, tmp_path, caplog):
    """DeepSeek-V3 stores MTP depth k as layer num_hidden_layers + k. transformers' own MtpModel loads them
    from the export and, given the same input hidden state, predicts the same logits as kmodel at every depth."""
    from transformers.modeling_layers import MtpModel

    rng = random.Random(f"mtp-{depth}")
    section = deepseek_v3(rng) | {"num_nextn_predict_layers": depth, "first_k_dense_replace": 1}
    cfg, model = build(section, depth)
    save_checkpoint(tmp_path / "ckpt", model, cfg)
    with caplog.at_level("WARNING", logger="kmodel.export.hf"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", family="deepseek_v3", dtype="float32")
    assert ("normalised output" in caplog.text) == (depth > 1)
    main = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    n = cfg.model.num_hidden_layers
    # The class names its MTP layers for the released 61-layer model only; point it at this model's.
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n + k}\..*" for k in range(depth)]
    mtp = MtpModel.from_pretrained(main).eval()
    for k in range(depth):
        ours = model.state_dict()
        assert torch.equal(mtp.layers[k].eh_proj.weight, ours[f"mtp.{k}.eh_proj.weight"])
        assert torch.equal(mtp.layers[k].post_norm.weight, ours[f"mtp.{k}.norm.weight"])

    model.eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 11), generator=torch.Generator().manual_seed(depth))
    with torch.no_grad():
        states = kmodel_depth_states(model, ids)
        for k in range(1, depth + 1):
            seq = ids.shape[1] - k
            theirs = mtp.forward_layer(
                k - 1, states[k - 1][:, :seq], torch.arange(k, k + seq)[None], None, input_ids=ids[:, k:]
            )
            ref = mtp._project_to_logits(theirs)
            ours = model.logits(states[k], model.mtp[k - 1].norm)
            rel = (ours - ref).abs().max() / ref.abs().max()
            assert rel < 1e-5, f"depth {k}: max relative logit error {rel:.2e}"


def test_mtp_export_to_exaone_moe_keeps_one_dense_depth_else_says_it_drops(tmp_path, caplog):
    """K-EXAONE's checkpoints hold one MTP module under `mtp.` (fc, pre_fc_norm_embedding, pre_fc_norm_hidden,
    layers.0, norm) with a dense feed-forward: kmodel's depth-1 dense MTP is written there and read back
    unchanged, and transformers' class loads the main model past it; other MTP shapes are dropped, saying so."""
    from safetensors.torch import load_file

    section = {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
        "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"], "rope_layers": "sliding",
        "num_experts": 4, "num_experts_per_tok": 2, "num_shared_experts": 1, "moe_intermediate_size": 24,
        "num_nextn_predict_layers": 1, "mtp_mlp_type": "dense",
    }
    cfg, model = build(section, 0)
    save_checkpoint(tmp_path / "ckpt", model, cfg)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", family="exaone_moe", dtype="float32")
    written = load_file(tmp_path / "hf" / "model.safetensors")
    ours = model.state_dict()
    expected = {
        "mtp.fc.weight": "mtp.0.eh_proj.weight",
        "mtp.pre_fc_norm_embedding.weight": "mtp.0.enorm.weight",
        "mtp.pre_fc_norm_hidden.weight": "mtp.0.hnorm.weight",
        "mtp.norm.weight": "mtp.0.norm.weight",
        "mtp.layers.0.input_layernorm.weight": "mtp.0.block.attn_in_norm.weight",
        "mtp.layers.0.self_attn.q_norm.weight": "mtp.0.block.self_attn.q_norm.weight",
        "mtp.layers.0.mlp.down_proj.weight": "mtp.0.block.mlp.down_proj.weight",
    }
    for hf_name, name in expected.items():
        assert torch.equal(written[hf_name], ours[name]), hf_name
    assert sum(k.startswith("mtp.") for k in written) == sum(k.startswith("mtp.") for k in ours)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["mtp_layer_types"] == ["full_attention"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    rel = (model.eval()(ids).logits - reference(ids).logits).abs().max() / reference(ids).logits.abs().max()
    assert rel < 1e-4

    for depth, mlp in ((2, "dense"), (1, "sparse")):
        cfg, model = build(section | {"num_nextn_predict_layers": depth, "mtp_mlp_type": mlp}, 0)
        out = tmp_path / f"{depth}-{mlp}"
        save_checkpoint(out / "ckpt", model, cfg)
        caplog.clear()
        with caplog.at_level("WARNING", logger="kmodel.export.hf"):
            export_hf(out / "ckpt", out / "hf", family="exaone_moe")
        assert f"drops the {depth} MTP depth(s)" in caplog.text
        assert not any(k.startswith("mtp.") for k in load_file(out / "hf" / "model.safetensors"))


def test_families_without_mtp_names_say_they_drop_them(tmp_path, caplog):
    cfg, model = build(axk1(random.Random("axk1-mtp")) | {"num_nextn_predict_layers": 2}, 0)
    save_checkpoint(tmp_path / "ckpt", model, cfg)
    with caplog.at_level("WARNING", logger="kmodel.export.hf"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", family="axk1")
    assert "drops the 2 MTP depth(s) (mtp.*): this class has no names for them" in caplog.text
