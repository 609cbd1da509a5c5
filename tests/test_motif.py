"""Motif-2: grouped differential attention and PolyNorm. transformers has no Motif class (the released models
load with remote code), so kmodel is checked against a float64 re-implementation written here, head by head,
from the published formulas (arXiv 2410.05258 and 2510.06949 for the attention, arXiv 2411.03884 for
PolyNorm), sharing no code with kmodel.model. Also: the cache, the Triton attention path, configs, export."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from cached_decoding import cached_logits

from kmodel.config import ConfigError, config_from_dict, load_config
from kmodel.export.hf import ExportError, choose_family
from kmodel.model import build_model
from kmodel.model.diff_attention import lambda_init_of

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def motif_section(rng: random.Random, **overrides) -> dict:
    noise = rng.choice([1, 2])
    ratio = rng.choice([1, 3])  # 1: the Differential Transformer's balanced split; 3: grouped (GDA)
    pairs = rng.choice([p for p in (1, 2) if noise % p == 0])
    model = {
        "vocab_size": 71, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 3,
        "num_attention_heads": noise * (ratio + 1), "num_noise_heads": noise, "num_key_value_heads": 2 * pairs,
        "head_dim": 8, "attention_kind": "differential", "qk_norm": False, "mlp_activation": "polynorm",
        "rope_theta": rng.choice([10000.0, 500000.0]), "rms_norm_eps": 1e-6, "attn_rms_norm_eps": 1e-5,
        "max_position_embeddings": 64, "initializer_range": 0.2,
    }
    model.update(overrides)
    return model


def build(section: dict, seed: int, **cfg_extra):
    cfg = config_from_dict({"seed": seed, "model": section, "kernels": {"attention": "torch", "norm": "torch",
                                                                         "moe": "torch", "loss": "torch"}, **cfg_extra})
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every constant-initialised parameter off its start so a misplaced one shows
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "subln.weight")):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("act_fn.weight", "act_fn.bias")):
                param.copy_(param + 0.2 * torch.randn(param.shape, generator=generator))
            elif ".lambda_" in name:
                param.copy_(0.4 * torch.randn(param.shape, generator=generator))
    return cfg, model


def reference_logits(w: dict[str, torch.Tensor], m, ids: torch.Tensor) -> torch.Tensor:
    """One sequence, float64, head by head from the formulas."""
    seq, d = ids.shape[0], m.head_dim
    heads, noise, pairs = m.num_attention_heads, m.num_noise_heads, m.num_key_value_heads // 2
    signal = heads - noise
    ratio = signal // noise
    pos = torch.arange(seq, dtype=torch.float64)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    def rms(x, weight, eps):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):  # (seq, heads, d): pairs (i, i + d/2) turn by pos * theta^(-2i/d)
        half = d // 2
        angle = pos[:, None] * m.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def softmax_map(q, k):  # (seq, d) x (seq, d)
        scores = (q @ k.T) / math.sqrt(d)
        return torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)

    def norm_power(z, eps=1e-6):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps)

    x = w["embed_tokens.weight"][ids]
    for i in range(m.num_hidden_layers):
        p = f"layers.{i}."
        a = f"{p}self_attn."
        h = rms(x, w[p + "attn_in_norm.weight"], m.rms_norm_eps)
        q = rotate((h @ w[a + "q_proj.weight"].T).view(seq, heads, d))
        k = rotate((h @ w[a + "k_proj.weight"].T).view(seq, 2 * pairs, d))
        v = (h @ w[a + "v_proj.weight"].T).view(seq, 2 * pairs, d)
        init = 0.8 - 0.6 * math.exp(-0.3 * (i - 1))
        lam = (torch.exp(w[a + "lambda_q1"] @ w[a + "lambda_k1"]) - torch.exp(w[a + "lambda_q2"] @ w[a + "lambda_k2"])
               + init)
        outs = []
        for s in range(signal):
            group = s // ratio
            pair = group // (noise // pairs)
            q_signal, q_noise = q[:, group * (ratio + 1) + s % ratio], q[:, group * (ratio + 1) + ratio]
            k_signal, k_noise = k[:, 2 * pair], k[:, 2 * pair + 1]
            values = torch.cat((v[:, 2 * pair], v[:, 2 * pair + 1]), dim=-1)  # (seq, 2d)
            head = (softmax_map(q_signal, k_signal) - lam * softmax_map(q_noise, k_noise)) @ values
            outs.append(rms(head, w[a + "subln.weight"], m.attn_rms_norm_eps) * (1 - init))
        x = x + torch.cat(outs, dim=-1) @ w[a + "o_proj.weight"].T
        h = rms(x, w[p + "mlp_in_norm.weight"], m.rms_norm_eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        c, bias = w[p + "mlp.act_fn.weight"], w[p + "mlp.act_fn.bias"]
        act = c[0] * norm_power(gate**3) + c[1] * norm_power(gate**2) + c[2] * norm_power(gate) + bias
        x = x + (act * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["norm.weight"], m.rms_norm_eps) @ w["lm_head.weight"].T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_motif_matches_independent_float64_reimplementation(seed):
    cfg, model = build(motif_section(random.Random(f"motif-{seed}")), seed)
    model.double().eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = model(ids).logits
    weights = {name: t.detach() for name, t in model.state_dict().items()}
    for row in range(ids.shape[0]):
        ref = reference_logits(weights, cfg.model, ids[row])
        rel = (ours[row] - ref).abs().max() / ref.abs().max()
        assert rel <= 1e-10, f"max relative logit error {rel:.2e}"


def test_lambda_init_follows_the_layer_depth_and_the_features_change_the_output():
    assert lambda_init_of(1) == pytest.approx(0.2)
    assert lambda_init_of(0) == pytest.approx(0.8 - 0.6 * math.exp(0.3))
    section = motif_section(random.Random("change"), num_attention_heads=8, num_noise_heads=2, num_key_value_heads=4)
    _, model = build(section, 0)
    ids = torch.randint(0, 71, (1, 9), generator=torch.Generator().manual_seed(0))
    base = model.eval()(ids).logits
    with torch.no_grad():
        model.layers[0].self_attn.lambda_q2.add_(0.5)  # the noise map's weight
        assert (model(ids).logits - base).abs().max() > 1e-4
        model.layers[0].self_attn.lambda_q2.sub_(0.5)
        model.layers[1].mlp.act_fn.weight[0] += 0.5  # the cubic term
        assert (model(ids).logits - base).abs().max() > 1e-4


def test_generation_cache_matches_the_uncached_forward():
    section = motif_section(random.Random("cache"), sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                                                  "sliding_attention"])
    _, model = build(section, 1)
    model.eval()
    ids = torch.randint(0, 71, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    cached, cache = cached_logits(model, ids, prompt=5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert cache[0].keys.shape[1] == 3 and cache[1].keys.shape[1] == 12


def test_triton_attention_runs_the_differential_form():
    """kernels.attention: triton runs both maps through the Triton attention kernel (keys differ between the
    maps, values 2 * head_dim wide): forward and gradients equal the reference path."""
    section = motif_section(random.Random("triton"), num_hidden_layers=2)
    outputs = {}
    for impl in ("torch", "triton"):
        cfg, model = build(section, 2)
        model.use_kernels(cfg.kernels.model_copy(update={"attention": impl}), "cpu")
        ids = torch.randint(0, 71, (1, 16), generator=torch.Generator().manual_seed(2))
        out = model(ids, labels=torch.roll(ids, -1, dims=1))
        out.loss.backward()
        attn = model.layers[1].self_attn
        outputs[impl] = (out.loss.detach(), attn.q_proj.weight.grad.clone(), attn.lambda_k2.grad.clone())
    for ours, ref in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(ours, ref, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"num_noise_heads": None}, "attention_kind 'differential' requires num_noise_heads"),
    ({"num_attention_heads": 7, "num_noise_heads": 2}, r"num_noise_heads \(2\) must divide the signal heads"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads \(3\) must be even"),
    ({"qk_norm": True}, "qk_norm: differential attention normalises each head's output instead"),
    ({"num_experts": 4, "moe_intermediate_size": 16, "expert_activation": "clamped_swiglu"},
     "expert_activation 'clamped_swiglu' cannot be combined with it"),
    ({"polynorm_bias_clamp": 0.5}, "polynorm_bias_clamp clamps the routed experts' PolyNorm bias: it needs num_experts"),
    ({"mlp_activation": "swiglu", "polynorm_output_scale": 0.5}, "polynorm_output_scale only apply to mlp_activation"),
    ({"attention_kind": "gqa", "num_key_value_heads": 1}, "num_noise_heads only applies to attention_kind 'differential'"),
])
def test_bad_motif_config_names_the_key(overrides, message):
    section = {k: v for k, v in (motif_section(random.Random("bad"), num_attention_heads=4, num_noise_heads=1,
                                               num_key_value_heads=2) | overrides).items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": section})


def test_no_transformers_class_expresses_motif():
    m = config_from_dict({"model": motif_section(random.Random("export"))}).model
    with pytest.raises(ExportError, match="no transformers class can express this config"):
        choose_family(m)
    with pytest.raises(ExportError, match="attention_kind 'differential'.*mlp_activation 'polynorm'"):
        choose_family(m, "exaone4")


@pytest.mark.parametrize("recipe", ["motif-2-12.7b.yaml", "tiny/motif-2.yaml"])
def test_motif_recipes_resolve(recipe):
    cfg = load_config(RECIPES / recipe)
    m = cfg.model
    assert m.attention_kind == "differential" and m.mlp_activation == "polynorm"
    if recipe.startswith("tiny/"):
        model = build_model(cfg)
        ids = torch.randint(0, m.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        out = model(ids, labels=torch.roll(ids, -1, dims=1))
        out.loss.backward()
        assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.parameters())
