"""Model core semantics: sliding windows, dropless MoE, balancing, determinism, caching, checkpoints."""

from __future__ import annotations

import pytest
import torch
from cached_decoding import cached_logits

from kmodel.checkpoint import CheckpointError, load_model, save_checkpoint
from kmodel.cli import main as cli_main
from kmodel.config import load_config
from kmodel.model import build_model
from kmodel.model.attention import Attention
from kmodel.model.init import initial_value

TINY = "recipes/tiny-ko-moe.yaml"
SMALL = [
    "model.vocab_size=101",
    "model.hidden_size=32",
    "model.head_dim=8",
    "model.intermediate_size=48",
    "model.moe_intermediate_size=16",
    "model.sliding_window=4",
    "kernels.attention=torch",
    "kernels.moe=torch",
    "kernels.norm=torch",
    "kernels.loss=torch",
]


def small_cfg(*extra: str):
    return load_config(TINY, SMALL + list(extra))


def test_sliding_layer_ignores_tokens_beyond_the_window_and_global_layer_does_not():
    cfg = small_cfg()
    window = cfg.model.sliding_window
    torch.manual_seed(0)
    for layer_idx, should_change in [(0, False), (3, True)]:
        attn = Attention(cfg.model, layer_idx).double()
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.3)
        seq = 12
        x = torch.randn(1, seq, cfg.model.hidden_size, dtype=torch.float64)
        positions = torch.arange(seq)
        from kmodel.model.rope import rope_cos_sin

        rope = rope_cos_sin(positions, cfg.model.head_dim, cfg.model.rope_theta)
        base = attn(x, rope, positions)
        query = seq - 1
        far = query - window  # the nearest position outside the window
        changed = x.clone()
        changed[0, : far + 1] += torch.randn(far + 1, cfg.model.hidden_size, dtype=torch.float64)
        out = attn(changed, rope, positions)
        moved = (out[0, query] - base[0, query]).abs().max().item()
        assert (moved > 1e-6) == should_change, (layer_idx, moved)
        # Inside the window, a change is always seen.
        near = x.clone()
        near[0, query - window + 1] += 1.0
        assert (attn(near, rope, positions)[0, query] - base[0, query]).abs().max() > 1e-6


def naive_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-slot loop: the definition of dropless top-k routing plus the shared expert."""
    cfg = moe.cfg
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens.float() @ moe.gate.weight.float().t()
    scores = logits.sigmoid()
    choice = scores + moe.gate.e_score_correction_bias
    out = torch.zeros_like(tokens)
    inter = cfg.moe_intermediate_size
    for t in range(tokens.shape[0]):
        top = torch.topk(choice[t], cfg.num_experts_per_tok).indices
        weights = scores[t, top]
        weights = weights / weights.sum() * cfg.routed_scaling_factor
        for e, w in zip(top.tolist(), weights):
            gate_up = moe.experts.gate_up_proj[e] @ tokens[t]
            hidden = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += w * (moe.experts.down_proj[e] @ hidden)
    return out + moe.shared_experts(tokens)


def test_moe_is_dropless_and_adds_the_shared_expert():
    cfg = small_cfg("model.num_experts=6", "model.num_experts_per_tok=3")
    model = build_model(cfg)
    moe = model.layers[1].mlp
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(2, 9, cfg.model.hidden_size)
    moe.eval()
    out, _ = moe(x)
    torch.testing.assert_close(out.reshape(-1, x.shape[-1]), naive_moe(moe, x), rtol=1e-5, atol=1e-5)
    # With the routed experts silenced, the shared expert alone remains.
    with torch.no_grad():
        moe.experts.down_proj.zero_()
    out, _ = moe(x)
    torch.testing.assert_close(out, moe.shared_experts(x), rtol=0, atol=0)


def test_router_stats_count_every_assignment_and_bias_update_balances_load():
    cfg = small_cfg("model.router_bias_update_rate=0.01")
    model = build_model(cfg).train()
    moe = model.layers[1].mlp
    with torch.no_grad():  # a skewed router: expert 0 wins for almost every token
        moe.gate.weight[0] = 0.0
        moe.gate.weight[0, 0] = 3.0
    x = torch.randn(4, 16, cfg.model.hidden_size).abs()
    imbalance = []
    for _ in range(60):
        moe(x)
        model.end_step()
        stats = model.router_stats()
        layer = stats["layers.1.mlp"]
        assert sum(layer["load"]) == 4 * 16 * cfg.model.num_experts_per_tok
        imbalance.append(layer["max_over_mean"])
    assert imbalance[0] > 2.0
    assert imbalance[-1] < 0.6 * imbalance[0], imbalance[::10]
    # The bias shifts selection only: routing weights still come from the unbiased scores.
    assert moe.gate.e_score_correction_bias.abs().sum() > 0


def test_aux_and_z_losses_are_added_in_training():
    cfg = small_cfg("model.aux_loss_coef=0.01", "model.router_z_loss_coef=0.001", "model.logits_z_loss_coef=1e-4")
    model = build_model(cfg).train()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    out = model(ids, ids)
    assert out.aux_loss > 0 and out.z_loss > 0 and out.mtp_loss is not None
    expected = out.lm_loss + out.aux_loss + 1e-4 * out.z_loss + cfg.model.mtp_loss_coef * out.mtp_loss
    torch.testing.assert_close(out.loss, expected)


def test_initialisation_is_a_function_of_seed_and_name_only():
    a = build_model(small_cfg("seed=5")).state_dict()
    b = build_model(small_cfg("seed=5")).state_dict()
    c = build_model(small_cfg("seed=6")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if not k.endswith("norm.weight"))
    # A deeper model, built in a different order, shares the weights of every parameter it has in common.
    deeper = build_model(small_cfg("seed=5", "model.num_hidden_layers=6", "model.sliding_window_pattern=LLLLLG"))
    shared = [k for k in a if k.startswith("layers.0.") or k.startswith("embed")]
    assert shared and all(torch.equal(a[k], deeper.state_dict()[k]) for k in shared)
    name = "layers.2.self_attn.q_proj.weight"
    torch.testing.assert_close(a[name], initial_value(name, a[name].shape, 5, 0.02), rtol=0, atol=0)
    # Routed experts are drawn one expert at a time, so a shard is drawn without the rest of the tensor.
    name = "layers.2.mlp.experts.down_proj"
    torch.testing.assert_close(a[name][3], initial_value(f"{name}.3", a[name].shape[1:], 5, 0.02), rtol=0, atol=0)


def test_an_expert_shard_is_built_with_exactly_its_rows_of_the_full_model():
    cfg = small_cfg("seed=5")
    full = build_model(cfg).state_dict()
    count = cfg.model.num_experts // 2
    shard = build_model(cfg, experts=(count, count)).state_dict()
    assert shard.keys() == full.keys()
    for name, tensor in shard.items():
        expected = full[name][count:] if ".experts." in name else full[name]
        assert torch.equal(tensor, expected), name


def test_cached_generation_matches_full_forward():
    cfg = small_cfg("model.sliding_window=3")
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 11))
    full = model(ids).logits
    cached, cache = cached_logits(model, ids, prompt=5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # Sliding layers keep only what a future query can see.
    assert cache[0].keys.shape[1] == cfg.model.sliding_window - 1
    assert cache[3].keys.shape[1] == ids.shape[1]


def test_document_masking_isolates_packed_documents():
    cfg = small_cfg()
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 14))
    segments = torch.tensor([[0] * 6 + [1] * 8])
    base = model(ids, segment_ids=segments).logits
    changed = ids.clone()
    changed[0, :6] = torch.randint(0, cfg.model.vocab_size, (6,))
    out = model(changed, segment_ids=segments).logits
    torch.testing.assert_close(out[0, 6:], base[0, 6:], rtol=1e-5, atol=1e-6)
    assert (model(changed).logits[0, 6:] - model(ids).logits[0, 6:]).abs().max() > 1e-4


def test_init_command_and_load_model_round_trip(tmp_path):
    out = tmp_path / "init"
    assert cli_main(["init", TINY, "--out", str(out), "--seed", "11", *sum([["--set", s] for s in SMALL], [])]) == 0
    model = load_model(out)
    fresh = build_model(small_cfg("seed=11")).eval()
    ids = torch.randint(0, 101, (1, 8))
    assert torch.equal(model(ids).logits, fresh(ids).logits)
    # Refuses to overwrite, and a checkpoint of another shape is a clear error.
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(out, fresh, small_cfg())
    other = build_model(small_cfg("model.hidden_size=48"))
    from kmodel.checkpoint import load_weights_into, read_weights

    with pytest.raises(CheckpointError, match="does not fit this model config: shape mismatch"):
        load_weights_into(other, read_weights(out), str(out))
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_model(out)



def test_saving_the_same_weights_twice_gives_the_same_bytes(tmp_path):
    """The ledger records checkpoint file hashes, so a save must be a function of its contents (safetensors
    writes multi-key metadata in hash order: it once differed in 1 save of 4)."""
    cfg = small_cfg()
    model = build_model(cfg)
    manifests = [save_checkpoint(tmp_path / f"step_{i:07d}", model, cfg, state={"step": 1}) for i in range(12)]
    assert all(m == manifests[0] for m in manifests)
