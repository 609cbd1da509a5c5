"""Motif-3 pieces: grouped PolyNorm in the routed experts (per-expert coefficients through a sigmoid, the routed
bias clamp, the output scale). transformers has no Motif class, so kmodel is checked against float64
re-implementations written here from the published formulas (arXiv 2411.03884 for PolyNorm; the sigmoid, clamp
and scale as Motif-3's released modeling code describes them), sharing no code with kmodel.model."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from cached_decoding import cached_logits

from kmodel.config import ConfigError, config_from_dict, load_config
from kmodel.model import build_model
from kmodel.plan import parameter_counts

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TORCH_KERNELS = {"attention": "torch", "norm": "torch", "moe": "torch", "loss": "torch"}


def moe_section(**overrides) -> dict:
    model = {
        "vocab_size": 53, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "qk_norm": False,
        "num_experts": 5, "num_experts_per_tok": 2, "num_shared_experts": 1, "moe_intermediate_size": 12,
        "first_k_dense_replace": 1, "routed_scaling_factor": 1.5, "router_bias_update_rate": 0.0,
        "mlp_activation": "polynorm", "polynorm_sigmoid_weight": True, "polynorm_output_scale": 0.5,
        "polynorm_bias_clamp": 0.5, "initializer_range": 0.3, "max_position_embeddings": 64,
    }
    model.update(overrides)
    return model


def build(section: dict, seed: int, **kernels):
    cfg = config_from_dict({"seed": seed, "model": section, "kernels": TORCH_KERNELS | kernels})
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every constant-initialised parameter off its start so a misplaced one shows
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "subln.weight")):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif "polynorm" in name or "act_fn" in name:
                param.copy_(param + 0.8 * torch.randn(param.shape, generator=generator))
    return cfg, model


# --- the float64 reference ------------------------------------------------------------------------------
def rms_normed(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps)


def reference_polynorm(gate, weight, bias, m, routed: bool):
    """Motif-3's PolyNorm of one expert (or a dense/shared MLP): sigmoid weights, routed bias clamp, scale."""
    c = torch.sigmoid(weight) if m.polynorm_sigmoid_weight else weight
    b = bias.clamp(-m.polynorm_bias_clamp, m.polynorm_bias_clamp) if routed and m.polynorm_bias_clamp else bias
    poly = c[0] * rms_normed(gate**3) + c[1] * rms_normed(gate**2) + c[2] * rms_normed(gate) + b
    return m.polynorm_output_scale * poly


def reference_moe(w: dict[str, torch.Tensor], p: str, m, x: torch.Tensor) -> torch.Tensor:
    """tokens (n, h) -> MoE output: sigmoid router, top-k, normalised and scaled weights, every chosen expert's
    own PolyNorm, plus the shared expert (its single PolyNorm, bias unclamped)."""
    scores = torch.sigmoid(x @ w[p + "gate.weight"].T)
    chosen = scores.topk(m.num_experts_per_tok, dim=-1).indices
    im = m.moe_intermediate_size
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        picked = scores[t, chosen[t]]
        weights = picked / picked.sum() * m.routed_scaling_factor
        for e, weight in zip(chosen[t].tolist(), weights):
            gate_up = w[p + "experts.gate_up_proj"][e] @ x[t]
            act = reference_polynorm(gate_up[:im], w[p + "experts.polynorm_weight"][e], w[p + "experts.polynorm_bias"][e],
                                     m, routed=True)
            out[t] += weight * (w[p + "experts.down_proj"][e] @ (act * gate_up[im:]))
    s = p + "shared_experts."
    gate, up = x @ w[s + "gate_proj.weight"].T, x @ w[s + "up_proj.weight"].T
    act = reference_polynorm(gate, w[s + "act_fn.weight"], w[s + "act_fn.bias"], m, routed=False)
    return out + (act * up) @ w[s + "down_proj.weight"].T


# --- grouped PolyNorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_polynorm_moe_matches_float64_reference_with_gradients(seed):
    cfg, model = build(moe_section(), seed)
    moe = model.layers[1].mlp.double()
    weights = dict(moe.named_parameters())
    x = torch.randn(7, cfg.model.hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours, _ = moe(x[None])
    ref_weights = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    ref = reference_moe(ref_weights, "", cfg.model, x)
    torch.testing.assert_close(ours[0], ref, rtol=1e-10, atol=1e-12)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    (ours[0] * probe).sum().backward()
    (ref * probe).sum().backward()
    for name in ("experts.polynorm_weight", "experts.polynorm_bias", "experts.gate_up_proj", "shared_experts.act_fn.bias"):
        torch.testing.assert_close(weights[name].grad, ref_weights[name].grad, rtol=1e-9, atol=1e-12)
    assert weights["experts.polynorm_bias"].grad.abs().sum() > 0  # some biases sit inside the clamp


def test_bias_clamp_output_scale_and_sigmoid_each_change_the_output():
    """The options are not cosmetic: a routed bias beyond the clamp acts as the clamp value; the shared expert's
    bias is not clamped; the scale and the sigmoid change the output."""
    section = moe_section()
    cfg, model = build(section, 3)
    moe = model.layers[1].mlp.double().eval()
    x = torch.randn(1, 6, cfg.model.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        moe.experts.polynorm_bias.fill_(3.0)
        beyond, _ = moe(x)
        moe.experts.polynorm_bias.fill_(0.5)
        at_clamp, _ = moe(x)
        torch.testing.assert_close(beyond, at_clamp, rtol=0, atol=0)
        moe.shared_experts.act_fn.bias.fill_(3.0)
        shared_beyond, _ = moe(x)
        assert (shared_beyond - at_clamp).abs().max() > 1e-3
    for key, value in (("polynorm_output_scale", 1.0), ("polynorm_sigmoid_weight", False)):
        _, other = build(section | {key: value}, 3)
        other.load_state_dict(model.state_dict())
        other_out, _ = other.layers[1].mlp.double()(x)
        assert (other_out - beyond).abs().max() > 1e-3, key


def test_grouped_polynorm_initialises_every_coefficient_at_one_third():
    cfg = config_from_dict({"seed": 0, "model": moe_section(), "kernels": TORCH_KERNELS})
    model = build_model(cfg)
    experts = model.layers[1].mlp.experts
    torch.testing.assert_close(torch.sigmoid(experts.polynorm_weight), torch.full((5, 3), 1 / 3))
    assert experts.polynorm_bias.abs().max() == 0
    plain = build_model(config_from_dict({"seed": 0, "model": moe_section(polynorm_sigmoid_weight=False)}))
    torch.testing.assert_close(plain.layers[1].mlp.experts.polynorm_weight, torch.full((5, 3), 1 / 3))


def test_expert_parallel_shard_keeps_its_experts_coefficients():
    _, model = build(moe_section(), 4)
    experts = model.layers[1].mlp.experts
    full_weight, full_bias = experts.polynorm_weight.detach().clone(), experts.polynorm_bias.detach().clone()
    experts.keep_experts(2, 2)
    torch.testing.assert_close(experts.polynorm_weight.detach(), full_weight[2:4])
    torch.testing.assert_close(experts.polynorm_bias.detach(), full_bias[2:4])


def test_triton_moe_refuses_grouped_polynorm_by_name():
    with pytest.raises(ValueError, match="kernels.moe: triton does not implement PolyNorm routed experts"):
        build_model(config_from_dict({"model": moe_section(), "kernels": TORCH_KERNELS | {"moe": "triton"}}))


def test_planner_counts_grouped_polynorm():
    cfg = config_from_dict({"model": moe_section()})
    model = build_model(cfg)
    assert parameter_counts(cfg.model).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("overrides, message", [
    ({"polynorm_output_scale": 0.0}, "polynorm_output_scale"),
    ({"mlp_activation": "swiglu"}, "polynorm_sigmoid_weight, polynorm_bias_clamp, polynorm_output_scale only apply to mlp_activation"),
    ({"num_experts": 0, "first_k_dense_replace": 0}, "polynorm_bias_clamp clamps the routed experts"),
])
def test_bad_polynorm_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": moe_section(**overrides)})


def test_polynorm_of_one_third_each_is_the_mean_of_the_normalised_powers():
    """A hand-checkable value: with weights 1/3, bias 0 and scale 1, one row [1, -1] gives
    (N([1, -1]) + N([1, 1]) + N([1, -1])) / 3 = [1, -1/3]."""
    from kmodel.kernels.moe.reference import polynorm

    out = polynorm(torch.tensor([[1.0, -1.0]], dtype=torch.float64), torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -1 / 3]], dtype=torch.float64))


# --- the whole Motif-3 architecture -------------------------------------------------------------------------
def motif3_section(rng: random.Random, **overrides) -> dict:
    noise = rng.choice([1, 2])
    ratio = rng.choice([1, 3])  # 1: the Differential Transformer's balanced split; 3: grouped (GDA)
    pairs = rng.choice([p for p in (1, 2) if noise % p == 0])
    model = moe_section(
        num_hidden_layers=3, hidden_size=24, num_attention_heads=noise * (ratio + 1), num_noise_heads=noise,
        num_key_value_heads=2 * pairs, head_dim=None,
        attention_kind="differential_latent", q_lora_rank=rng.choice([None, 12]), kv_lora_rank=10,
        qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6, attention_output_gate=rng.choice([True, False]),
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4,
        hc_mult=rng.choice([2, 3]), rope_theta=rng.choice([10000.0, 500000.0]), rms_norm_eps=1e-6,
        attn_rms_norm_eps=1e-5,
    )
    model.update(overrides)
    return model


def reference_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp on one (n, n) matrix: positive entries, then rows and columns rescaled in turn."""
    m = logits.exp()
    for _ in range(iters):
        m = torch.diag(1 / m.sum(dim=1)) @ m
        m = m @ torch.diag(1 / m.sum(dim=0))
    return m


def reference_hc(w, p: str, m, streams: torch.Tensor):
    """streams (seq, n, C) -> per token (H_pre (n,), H_post (n,), H_res (n, n)) from the mHC formulas."""
    n = m.hc_mult
    flat = streams.reshape(streams.shape[0], -1)
    normed = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + m.hc_eps)
    fn, bias, scale = w[p + "fn"], w[p + "bias"], w[p + "scale"]
    out = []
    for t in range(flat.shape[0]):
        z = fn @ normed[t]
        h_pre = torch.sigmoid(scale[0] * z[:n] + bias[:n])
        h_post = 2 * torch.sigmoid(scale[1] * z[n : 2 * n] + bias[n : 2 * n])
        h_res = reference_sinkhorn((scale[2] * z[2 * n :] + bias[2 * n :]).view(n, n), m.hc_sinkhorn_iters)
        out.append((h_pre, h_post, h_res))
    return out


def reference_motif3_logits(w: dict[str, torch.Tensor], m, ids: torch.Tensor) -> torch.Tensor:
    """One sequence, float64, head by head and token by token from the published formulas."""
    seq, heads, noise, pairs = ids.shape[0], m.num_attention_heads, m.num_noise_heads, m.num_key_value_heads // 2
    signal = heads - noise
    ratio = signal // noise
    nope, rope, vd = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    pos = torch.arange(seq, dtype=torch.float64)

    def rms(x, weight, eps):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):  # (seq, rope): pairs (i, i + rope/2) turn by pos * theta^(-2i/rope)
        half = rope // 2
        angle = pos[:, None] * m.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rope)
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()), dim=-1)

    def attention(h, a, window):
        i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        visible = (j <= i) & ((i - j < window) if window else True)
        if m.q_lora_rank is None:
            q = h @ w[a + "q_proj.weight"].T
        else:
            q = rms(h @ w[a + "q_a_proj.weight"].T, w[a + "q_a_layernorm.weight"], m.rms_norm_eps) @ w[a + "q_b_proj.weight"].T
        q = q.view(seq, heads, nope + rope)
        kv_a = h @ w[a + "kv_a_proj_with_mqa.weight"].T
        latent = rms(kv_a[:, : m.kv_lora_rank], w[a + "kv_a_layernorm.weight"], m.rms_norm_eps)
        rope_key = rotate(kv_a[:, m.kv_lora_rank :])
        kv = (latent @ w[a + "kv_b_proj.weight"].T).view(seq, 2 * pairs, nope + vd)
        lam = torch.sigmoid(h @ w[a + "lambda_proj.weight"].T)  # (seq, signal heads)

        def softmax_map(query_head, key_head):
            query = torch.cat((q[:, query_head, :nope], rotate(q[:, query_head, nope:])), dim=-1)
            key = torch.cat((kv[:, key_head, :nope], rope_key), dim=-1)
            scores = (query @ key.T) / math.sqrt(nope + rope)
            return torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)

        outs = []
        for s in range(signal):
            group = s // ratio
            pair = group // (noise // pairs)
            signal_map = softmax_map(group * (ratio + 1) + s % ratio, 2 * pair)
            noise_map = softmax_map(group * (ratio + 1) + ratio, 2 * pair + 1)
            values = torch.cat((kv[:, 2 * pair, nope:], kv[:, 2 * pair + 1, nope:]), dim=-1)  # (seq, 2v)
            out = (signal_map - lam[:, s : s + 1] * noise_map) @ values
            outs.append(rms(out, w[a + "subln.weight"], m.attn_rms_norm_eps))
        out = torch.cat(outs, dim=-1)
        if m.attention_output_gate:
            out = out * torch.sigmoid(h @ w[a + "gate_proj.weight"].T)
        return out @ w[a + "o_proj.weight"].T

    def around(p, streams, sublayer):  # x_next = H_res x + H_post^T F(H_pre x), token by token
        maps = reference_hc(w, p, m, streams)
        inner = torch.stack([h_pre @ streams[t] for t, (h_pre, _, _) in enumerate(maps)])
        out = sublayer(inner)
        return torch.stack([h_res @ streams[t] + h_post[:, None] * out[t] for t, (_, h_post, h_res) in enumerate(maps)])

    streams = w["embed_tokens.weight"][ids][:, None, :].repeat(1, m.hc_mult, 1)
    for i in range(m.num_hidden_layers):
        p = f"layers.{i}."
        window = m.sliding_window if m.layer_types[i] == "sliding_attention" else None
        streams = around(p + "attn_hc.", streams,
                         lambda h, p=p, window=window: attention(rms(h, w[p + "attn_in_norm.weight"], m.rms_norm_eps),
                                                                 p + "self_attn.", window))

        def feed_forward(h, p=p, i=i):
            h = rms(h, w[p + "mlp_in_norm.weight"], m.rms_norm_eps)
            if m.mlp_layer_types[i] == "sparse":
                return reference_moe(w, p + "mlp.", m, h)
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            act = reference_polynorm(gate, w[p + "mlp.act_fn.weight"], w[p + "mlp.act_fn.bias"], m, routed=False)
            return (act * up) @ w[p + "mlp.down_proj.weight"].T

        streams = around(p + "mlp_hc.", streams, feed_forward)
    return rms(streams.mean(dim=1), w["norm.weight"], m.rms_norm_eps) @ w["lm_head.weight"].T


def perturb_motif3(model, seed: int) -> None:
    """Move the hyper-connections' gates and the lambda projection to sizes where every term matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("_hc.scale", "_hc.bias")):
                param.copy_(0.7 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("seed, overrides", [
    (0, {}),  # balanced heads (1 signal : 1 noise), low-rank query, gated, 2 streams
    (1, {"num_attention_heads": 8, "num_noise_heads": 2, "num_key_value_heads": 4, "hc_mult": 3}),  # 3:1, 2 pairs
    (2, {"num_attention_heads": 4, "num_noise_heads": 1, "num_key_value_heads": 2, "q_lora_rank": None,
         "attention_output_gate": True}),  # 3:1 on one key pair, full-rank query
])
def test_motif3_matches_independent_float64_reimplementation_with_gradients(seed, overrides):
    rng = random.Random(f"motif3-{seed}")
    cfg, model = build(motif3_section(rng, **overrides), seed)
    perturb_motif3(model, seed)
    model.double()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    ours = model(ids).logits
    params = dict(model.named_parameters())
    ref_params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    refs = torch.stack([reference_motif3_logits(ref_params, cfg.model, ids[row]) for row in range(ids.shape[0])])
    rel = (ours - refs).abs().max() / refs.abs().max()
    assert rel <= 1e-10, f"max relative logit error {rel:.2e}"
    probe = torch.randn(refs.shape, generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64)
    (ours * probe).sum().backward()
    (refs * probe).sum().backward()
    for name in ("layers.0.attn_hc.fn", "layers.1.mlp_hc.scale", "layers.2.self_attn.lambda_proj.weight",
                 "layers.1.self_attn.kv_b_proj.weight", "layers.2.mlp.experts.polynorm_weight", "embed_tokens.weight"):
        torch.testing.assert_close(params[name].grad, ref_params[name].grad, rtol=1e-8, atol=1e-12, msg=name)


def test_sinkhorn_projects_onto_doubly_stochastic_matrices():
    from kmodel.model.hyper_connections import sinkhorn

    # Columns sum to 1 after every step; rows converge geometrically, fast for logits of order 1 (mHC's regime,
    # 20 steps) and slower for spread ones (scale 3), which more steps settle.
    logits = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = sinkhorn(logits, 20)
    assert (m > 0).all()
    torch.testing.assert_close(m.sum(dim=-2), torch.ones(5, 4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.sum(dim=-1), torch.ones(5, 4, dtype=torch.float64), rtol=0, atol=1e-4)
    logits = 3 * logits
    many = sinkhorn(logits, 500)  # converged: rows too, and a fixed point of one more step
    torch.testing.assert_close(many.sum(dim=-1), torch.ones(5, 4, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(sinkhorn(many.log(), 1), many, rtol=0, atol=1e-10)
    m = sinkhorn(logits, 20)
    for row in range(5):
        torch.testing.assert_close(m[row], reference_sinkhorn(logits[row], 20), rtol=1e-12, atol=1e-14)
    # Sinkhorn keeps the rank-one structure of exp(logits): D1 exp(L) D2, so a matrix already doubly stochastic
    # (the uniform one) is a fixed point, and adding a row constant to the logits changes nothing.
    torch.testing.assert_close(sinkhorn(torch.zeros(3, 3), 1), torch.full((3, 3), 1 / 3))
    torch.testing.assert_close(sinkhorn(logits + torch.arange(4.0)[:, None], 20), m, rtol=1e-9, atol=1e-12)


def test_lambda_is_a_sigmoid_of_the_token_and_the_gate_multiplies_elementwise():
    rng = random.Random("lambda")
    cfg, model = build(motif3_section(rng, attention_output_gate=True, num_attention_heads=8, num_noise_heads=2), 5)
    attn = model.layers[0].self_attn.double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, cfg.model.hidden_size, generator=g, dtype=torch.float64)
    signal = torch.randn(1, 3, attn.signal_heads, 2 * cfg.model.v_head_dim, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 3, attn.noise_heads, 2 * cfg.model.v_head_dim, generator=g, dtype=torch.float64)
    lam = torch.sigmoid(x @ attn.lambda_proj.weight.T)[..., None]
    assert 0 < lam.min() and lam.max() < 1 and lam.std() > 0.01  # data-dependent, inside (0, 1)
    diff = signal - lam * noise.repeat_interleave(attn.grouped_ratio, dim=2)  # each group's noise map
    normed = diff / torch.sqrt(diff.pow(2).mean(-1, keepdim=True) + cfg.model.attn_rms_norm_eps) * attn.subln.weight
    gated = normed.reshape(1, 3, -1) * torch.sigmoid(x @ attn.gate_proj.weight.T)
    torch.testing.assert_close(attn.combine(x, signal, noise), gated, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        attn.gate_proj.weight.zero_()  # gate 1/2 everywhere: half the ungated output
    torch.testing.assert_close(attn.combine(x, signal, noise), 0.5 * normed.reshape(1, 3, -1), rtol=1e-12, atol=1e-14)


def test_motif3_generation_cache_matches_the_uncached_forward():
    _, model = build(motif3_section(random.Random("cache"), q_lora_rank=12), 6)
    model.eval()
    ids = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(6))
    full = model(ids).logits
    cached, cache = cached_logits(model, ids, prompt=5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert cache[0].keys.shape[1] == 3 and cache[1].keys.shape[1] == 11  # the sliding layer keeps window - 1
    assert cache[1].keys.shape[-1] == 10  # the latent, not per-head keys


def test_triton_attention_runs_the_differential_latent_form():
    """kernels.attention: triton runs both maps (their own keys, shared values) through the Triton kernel:
    forward and gradients equal the reference path."""
    section = motif3_section(random.Random("triton"), num_hidden_layers=2, layer_types=None, sliding_window=None,
                             attention_output_gate=True)
    outputs = {}
    for impl in ("torch", "triton"):
        _, model = build(section, 7, attention=impl)
        ids = torch.randint(0, 53, (1, 16), generator=torch.Generator().manual_seed(7))
        out = model(ids, labels=torch.roll(ids, -1, dims=1))
        out.loss.backward()
        attn = model.layers[1].self_attn
        outputs[impl] = (out.loss.detach(), attn.kv_b_proj.weight.grad.clone(), attn.lambda_proj.weight.grad.clone())
    for ours, ref in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(ours, ref, rtol=2e-4, atol=1e-5)


def test_planner_counts_motif3():
    for gate, rank in ((True, 12), (False, None)):
        cfg = config_from_dict({"model": motif3_section(random.Random("plan"), attention_output_gate=gate, q_lora_rank=rank)})
        model = build_model(cfg)
        assert parameter_counts(cfg.model).total == sum(p.numel() for p in model.parameters())


def test_no_transformers_class_expresses_motif3():
    from kmodel.export.hf import ExportError, choose_family

    m = config_from_dict({"model": motif3_section(random.Random("export"))}).model
    with pytest.raises(ExportError, match="no transformers class can express this config"):
        choose_family(m)
    with pytest.raises(ExportError, match="hc_mult"):
        choose_family(m, "deepseek_v3")


@pytest.mark.parametrize("overrides, message", [
    ({"attention_kind": "mla"}, "attention_output_gate only applies to attention_kind 'differential_latent'"),
    ({"kv_lora_rank": None}, "attention_kind 'differential_latent' requires kv_lora_rank"),
    ({"num_nextn_predict_layers": 1}, r"hc_mult > 1 \(hyper-connections\) with num_nextn_predict_layers"),
    ({"hc_mult": 0}, "hc_mult"),
    ({"hc_sinkhorn_iters": 0}, "hc_sinkhorn_iters"),
])
def test_bad_motif3_config_names_the_key(overrides, message):
    section = motif3_section(random.Random("bad"), attention_output_gate=True) | overrides
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": section})


@pytest.mark.parametrize("recipe", ["motif-3.yaml", "tiny/motif-3.yaml"])
def test_motif3_recipes_resolve_and_the_tiny_one_trains(recipe):
    cfg = load_config(RECIPES / recipe)
    m = cfg.model
    assert m.attention_kind == "differential_latent" and m.hc_mult == 4 and m.polynorm_bias_clamp == 0.5
    assert m.layer_types[0] == "full_attention" and m.layer_types[1:3] == ["sliding_attention"] * 2
    if recipe.startswith("tiny/"):
        model = build_model(cfg)
        ids = torch.randint(0, m.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        out = model(ids, labels=torch.roll(ids, -1, dims=1))
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(math.log(m.vocab_size), rel=0.1)
        grads = [p.grad for name, p in model.named_parameters() if name.endswith(("_hc.fn", "polynorm_weight"))]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_muonclip_refuses_differential_latent_attention_by_name():
    with pytest.raises(ConfigError, match="train.qk_clip_tau: MuonClip caps the logits of softmax heads"):
        load_config(RECIPES / "tiny" / "motif-3.yaml", ["train.optimizer=muon", "train.qk_clip_tau=100"])


def test_planner_activation_estimate_counts_the_differential_latent_heads_and_the_streams():
    from kmodel.plan import activation_elements_per_token

    base = motif3_section(random.Random("acts"), q_lora_rank=12, attention_output_gate=False)
    m = config_from_dict({"model": base}).model
    parts = activation_elements_per_token(m, True)
    n, h, signal, v = m.hc_mult, m.hidden_size, m.num_attention_heads - m.num_noise_heads, m.v_head_dim
    assert parts["hyper_connections"] == 2 * (3 * n * h + 2 * n + n * n + m.hc_sinkhorn_iters * 4 * n * n)
    gated = activation_elements_per_token(config_from_dict({"model": base | {"attention_output_gate": True}}).model, True)
    assert gated["attention"] - parts["attention"] == 2 * signal * 2 * v
    plain = activation_elements_per_token(config_from_dict({"model": base | {"hc_mult": 1}}).model, True)
    assert "hyper_connections" not in plain and plain["attention"] == parts["attention"]
