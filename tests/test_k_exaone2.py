"""K-EXAONE 2.0's per-layer sliding windows and per-layer SwiGLU clamps: each layer attends exactly its own
window, clamps follow their formula in the dense MLP, the shared and the routed experts, the cache keeps each
layer's window, the exaone_moe export takes only what that class expresses, and the recipes build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cached_decoding import cached_logits

from kmodel.config import ConfigError, KernelsConfig, config_from_dict, load_config
from kmodel.export.hf import ExportError, choose_family
from kmodel.model import build_model
from kmodel.model.attention import Attention
from kmodel.model.moe import MLP, MoE
from kmodel.model.rope import rope_cos_sin

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def section(**overrides) -> dict:
    model = {
        "vocab_size": 61, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
        "sliding_windows": [2, 5, 3, None], "rope_layers": "sliding",
        "num_experts": 4, "num_experts_per_tok": 2, "num_shared_experts": 1, "moe_intermediate_size": 16,
        "first_k_dense_replace": 1, "swiglu_limits": [0.3, None, 0.2, 0.5],
    }
    model.update(overrides)
    return model


def cfg_of(**overrides):
    return config_from_dict({"seed": 3, "model": section(**overrides), "kernels": KernelsConfig(
        attention="torch", moe="torch", norm="torch", loss="torch").model_dump()})


def moved(attn: Attention, rope, x: torch.Tensor, base: torch.Tensor, position: int) -> float:
    """How far the last query's output moves when the input at `position` changes."""
    changed = x.clone()
    changed[0, position] += 1.0
    return (attn(changed, rope, torch.arange(x.shape[1]))[0, -1] - base).abs().max().item()


def test_sliding_windows_set_the_layer_types_and_each_layer_sees_its_own_window():
    m = cfg_of().model
    assert m.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert m.sliding_window == 5  # the largest, for whatever needs one number (planner, KV-cache estimates)
    torch.manual_seed(0)
    seq, query = 12, 11
    positions = torch.arange(seq)
    rope = rope_cos_sin(positions, m.head_dim, m.rope_theta, dtype=torch.float64)
    for layer, window in enumerate([2, 5, 3, None]):
        attn = Attention(m, layer).double()
        assert attn.window == window
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.3)
        x = torch.randn(1, seq, m.hidden_size, dtype=torch.float64)
        base = attn(x, rope, positions)[0, query]

        oldest_seen = 0 if window is None else query - window + 1
        assert moved(attn, rope, x, base, oldest_seen) > 1e-6, (layer, window)
        if window is not None:
            assert moved(attn, rope, x, base, oldest_seen - 1) == 0.0, (layer, window)


def test_cached_generation_keeps_each_layers_window():
    cfg = cfg_of()
    model = build_model(cfg).eval()
    ids = torch.randint(0, 61, (1, 13), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cached, cache = cached_logits(model, ids, prompt=4)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert [c.keys.shape[1] for c in cache] == [1, 4, 2, 13]  # window - 1 per sliding layer, all for the full one


def limited(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate).clamp(max=limit) * up.clamp(-limit, limit)


def test_clamps_follow_the_formula_in_the_dense_mlp_and_in_every_expert():
    cfg = cfg_of()
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, cfg.model.hidden_size, generator=generator) * 4
    dense = model.layers[0].mlp
    assert isinstance(dense, MLP) and dense.swiglu_limit == 0.3
    expected = dense.down_proj(limited(dense.gate_proj(x), dense.up_proj(x), 0.3))
    torch.testing.assert_close(dense(x), expected)
    unclamped = dense.down_proj(F.silu(dense.gate_proj(x)) * dense.up_proj(x))
    assert (dense(x) - unclamped).abs().max() > 1e-3  # the clamp bites

    moe = model.layers[2].mlp  # clamp 0.2
    assert isinstance(moe, MoE)
    out, _ = moe(x[None])
    scores = (x @ moe.gate.weight.t()).sigmoid()
    inter = cfg.model.moe_intermediate_size
    naive = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top = torch.topk(scores[t] + moe.gate.e_score_correction_bias, 2).indices
        weights = scores[t, top] / scores[t, top].sum() * cfg.model.routed_scaling_factor
        for e, w in zip(top.tolist(), weights):
            gate_up = moe.experts.gate_up_proj[e] @ x[t]
            naive[t] += w * (moe.experts.down_proj[e] @ limited(gate_up[:inter], gate_up[inter:], 0.2))
    shared = moe.shared_experts
    naive += shared.down_proj(limited(shared.gate_proj(x), shared.up_proj(x), 0.2))
    torch.testing.assert_close(out[0], naive, rtol=1e-5, atol=1e-6)
    assert model.layers[1].mlp.experts.swiglu_limit is None and model.layers[1].mlp.shared_experts.swiglu_limit is None


def test_bad_windows_or_clamps_name_the_key():
    for overrides, message in [
        ({"sliding_windows": [4, 4, None]}, "sliding_windows has 3 entries for num_hidden_layers=4"),
        ({"sliding_windows": [4, 0, 4, None]}, r"sliding_windows\[1\] is 0"),
        ({"sliding_window": 3}, r"sliding_window \(3\) must be the largest of sliding_windows \(5\)"),
        ({"sliding_window_pattern": "LLLG"}, "sliding_window_pattern and sliding_windows"),
        ({"swiglu_limits": [1.0]}, "swiglu_limits has 1 entries"),
        ({"swiglu_limits": [1.0, -1.0, None, None]}, r"swiglu_limits\[1\] is -1.0"),
        ({"mtp_mlp_type": "sparse", "num_experts": 0, "num_shared_experts": 0, "first_k_dense_replace": 0,
          "num_nextn_predict_layers": 1}, "mtp_mlp_type 'sparse' needs routed experts"),
    ]:
        with pytest.raises(ConfigError, match=message):
            cfg_of(**overrides)


def test_triton_moe_refuses_the_clamps_by_name_and_auto_falls_back():
    cfg = cfg_of()
    model = build_model(cfg)
    with pytest.raises(ValueError, match=r"kernels.moe: triton does not implement the per-layer SwiGLU clamps \(swiglu_limits\)"):
        model.use_kernels(KernelsConfig(moe="triton"), "cpu")
    model.use_kernels(KernelsConfig(moe="auto"), "cpu")  # auto picks what implements it


def test_exaone_moe_export_takes_equal_windows_and_refuses_per_layer_features_by_name():
    equal = cfg_of(sliding_windows=[4, 4, 4, None], swiglu_limits=None).model
    assert choose_family(equal, "exaone_moe").config_json(cfg_of(sliding_windows=[4, 4, 4, None], swiglu_limits=None))[
        "sliding_window"] == 4
    with pytest.raises(ExportError, match="sliding_windows"):
        choose_family(cfg_of(swiglu_limits=None).model, "exaone_moe")
    with pytest.raises(ExportError, match="swiglu_limits"):
        choose_family(cfg_of(sliding_windows=[4, 4, 4, None]).model, "exaone_moe")


@pytest.mark.parametrize("recipe", ["k-exaone-2.0.yaml", "tiny/k-exaone-2.yaml"])
def test_k_exaone2_recipes_resolve(recipe):
    cfg = load_config(RECIPES / recipe)
    m = cfg.model
    assert m.num_nextn_predict_layers == 4 and m.mtp_mlp_type == "dense"
    assert len(m.sliding_windows) == len(m.swiglu_limits) == m.num_hidden_layers
    with pytest.raises(ExportError, match="swiglu_limits"):
        choose_family(m, "exaone_moe")
    if recipe.startswith("tiny/"):
        assert len({w for w in m.sliding_windows if w}) > 1
        model = build_model(cfg)
        ids = torch.randint(0, m.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        out = model(ids, labels=torch.roll(ids, -1, dims=1))
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.mtp_loss is not None
        assert all(p.grad is not None for p in model.parameters())
    else:
        assert (m.num_hidden_layers, m.num_experts, m.num_experts_per_tok, m.num_shared_experts) == (78, 256, 8, 1)
