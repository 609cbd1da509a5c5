"""Motif-3 pieces: grouped PolyNorm in the routed experts (per-expert coefficients through a sigmoid, the routed
bias clamp, the output scale). transformers has no Motif class, so kmodel is checked against float64
re-implementations written here from the published formulas (arXiv 2411.03884 for PolyNorm; the sigmoid, clamp
and scale as Motif-3's released modeling code describes them), sharing no code with kmodel.model."""

from __future__ import annotations

import pytest
import torch

from kmodel.config import ConfigError, config_from_dict
from kmodel.model import build_model
from kmodel.plan import parameter_counts

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
