"""The planner's arithmetic against hand-computed cases, the model it describes, and a measured CPU run."""

from __future__ import annotations

import pytest
import torch

from kmodel.cli import main
from kmodel.config import config_from_dict, load_config
from kmodel.model import build_model
from kmodel.plan import (
    Assumptions,
    Cluster,
    PlanError,
    activation_bytes,
    all_to_all_bytes_per_step,
    check_fits,
    make_plan,
    mean_keys_seen,
    memory_per_gpu,
    parameter_counts,
    with_parallel,
    zero_bytes_per_step,
)

TINY = "recipes/tiny-ko-moe.yaml"
KEXAONE = "recipes/k-exaone-236b-a23b-multinode.yaml"

# vocab 16, hidden 8, 1 dense layer, 2 q heads / 1 kv head of 4, SwiGLU 16, untied, no QK-norm:
# embed 128 + head 128 + final norm 8 + q 64 + k 32 + v 32 + o 64 + 2 norms 16 + MLP 3*8*16=384 = 856
SMALL = {
    "model": {
        "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "qk_norm": False,
    },
    "train": {"micro_batch_size": 2, "grad_accum_steps": 3},
    "parallel": {"backend": "deepspeed", "world_size": 4, "zero_stage": 2},
}


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.tie_word_embeddings=true", "model.norm_placement=sandwich"],
     ["model.num_nextn_predict_layers=0", "model.num_shared_experts=0", "model.qk_norm=false"]],
)
def test_parameter_counts_match_the_model(overrides):
    cfg = load_config(TINY, overrides)
    model = build_model(cfg)
    counts = parameter_counts(cfg.model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert counts.expert == routed
    assert counts.active_expert == routed * cfg.model.num_experts_per_tok // cfg.model.num_experts


def test_hand_computed_zero2_memory():
    cfg = config_from_dict(SMALL)
    assert parameter_counts(cfg.model).total == 856
    mem = memory_per_gpu(cfg, 4, Assumptions(), fused_loss=True)
    assert mem.params == 856 * 2  # ZeRO-2 keeps full bf16 weights
    assert mem.grads == 856 / 4 * 2  # gradients sharded over 4 ranks
    assert mem.optimizer == 856 / 4 * 12  # fp32 master + m + v sharded
    stage3 = memory_per_gpu(with_parallel(cfg, 4, zero_stage=3), 4, Assumptions(), fused_loss=True)
    assert stage3.params == 856 / 4 * 2
    offload = memory_per_gpu(with_parallel(cfg, 4, offload_optimizer=True), 4, Assumptions(), fused_loss=True)
    assert offload.optimizer == 0 and offload.cpu_offloaded == 856 / 4 * 12


def test_hand_computed_activations():
    cfg = config_from_dict(SMALL)  # seq_len: max_position_embeddings 4096 (no data section)
    # per token: attention 2*8 + (2+2)*4 + 2*4 = 40, MLP 2*8 + 3*16 = 64, final norm 16 -> 120 elements
    assert activation_bytes(cfg, element_bytes=2, fused_loss=True) == 2 * 4096 * 120 * 2
    # an unfused loss adds fp32 logits and log-softmax: tokens * vocab * 4 * 2
    assert activation_bytes(cfg, element_bytes=2, fused_loss=False) == 2 * 4096 * (120 * 2 + 16 * 4 * 2)


def test_sliding_window_keys_and_zero_traffic():
    assert mean_keys_seen(8, 4) == (1 + 2 + 3 + 4 * 5) / 8
    assert mean_keys_seen(8, None) == (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) / 8
    assert mean_keys_seen(8, 100) == mean_keys_seen(8, None)
    one = 1000 * 2 * 3 / 4  # ring reduce-scatter of 1000 bf16 params over 4 ranks
    assert zero_bytes_per_step(1000, 4, 1, 2, 2) == 2 * one
    assert zero_bytes_per_step(1000, 4, 2, 2, 2) == 3 * one
    assert zero_bytes_per_step(1000, 4, 3, 2, 2) == 6 * one
    assert zero_bytes_per_step(1000, 1, 3, 2, 2) == 0


def test_all_to_all_volume():
    cfg = load_config(TINY, ["parallel.backend=deepspeed", "parallel.world_size=4", "parallel.expert_parallel_size=4"])
    # 3 sparse layers + the MTP block (sparse) = 4; 8*256 tokens, top-2, hidden 128, 2 bytes, 3/4 leave the rank,
    # 4 exchanges (dispatch + combine, forward + backward)
    expected = 4 * 4 * (8 * 256 * 2 * 128 * 2 * 3 / 4)
    assert all_to_all_bytes_per_step(cfg, 2) == expected


def test_plan_time_is_consistent():
    cfg = load_config("recipes/moe-30b-a3b-multinode.yaml")
    plan = make_plan(cfg, Cluster(2))
    assert plan.fits
    assert plan.step_s == pytest.approx(plan.compute_s + plan.comm_s)
    assert plan.tokens_per_day == pytest.approx(plan.tokens_per_step / plan.step_s * 86400)
    assert 0 < plan.mfu < plan.assumptions.kernel_efficiency  # recompute and communication cost something
    assert plan.days == pytest.approx(plan.token_budget / plan.tokens_per_day)


def test_k_exaone_on_one_node_fails_with_a_suggestion():
    cfg = load_config(KEXAONE, ["parallel.world_size=8", "parallel.expert_parallel_size=8"])
    plan = make_plan(cfg, Cluster(1))
    with pytest.raises(PlanError, match=r"does not fit on 1 node.*optimizer states.*--nodes \d+"):
        check_fits(plan, cfg)
    check_fits(make_plan(load_config(KEXAONE), Cluster(32)), load_config(KEXAONE))


def test_plan_cli(capsys):
    assert main(["plan", KEXAONE, "--nodes", "32"]) == 0
    out = capsys.readouterr().out
    for word in ("optimizer states", "activations", "EP all-to-all", "MFU", "tokens/day", "days", "fits: yes"):
        assert word in out
    assert main(["plan", KEXAONE, "--nodes", "1", "--set", "parallel.expert_parallel_size=8"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["plan", KEXAONE, "--nodes", "3"]) == 2  # 24 GPUs: EP 64 does not divide them
    assert "expert_parallel_size (64) does not divide the 24 GPUs" in capsys.readouterr().err


def test_estimate_against_measured_cpu_peak():
    """fp32 tiny recipe, one AdamW step on CPU: weights, gradients and optimizer state measured exactly,
    activations as the bytes autograd keeps for backward (distinct storages) at the end of forward."""
    cfg = load_config(TINY)
    model = build_model(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len),
                        generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(ids, ids).loss
    activations = sum(n for ptr, n in saved.items() if ptr not in params)
    loss.backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")

    estimate = memory_per_gpu(cfg, 1, Assumptions.for_dtype("fp32"), fused_loss=False)  # CPU: reference loss
    assert estimate.params == weights and estimate.grads == grads and estimate.optimizer == states
    assert 0.75 * activations < estimate.activations < 1.25 * activations, (estimate.activations, activations)
    measured = weights + grads + states + activations
    assert abs(estimate.total - measured) / measured < 0.15


def test_kv_cache_of_mla_counts_the_compressed_latent():
    from kmodel.config import load_config
    from kmodel.plan import kv_cache_bytes

    mla = load_config("recipes/tiny/deepseek-v3.yaml").model
    per_layer = (mla.kv_lora_rank + mla.qk_rope_head_dim) * 2  # bf16 latent + shared RoPE key per position
    assert kv_cache_bytes(mla, 100) == per_layer * 100 * mla.num_hidden_layers
    gqa = load_config("recipes/tiny-ko-moe.yaml").model
    kept = sum(min(100, gqa.sliding_window) if t == "sliding_attention" else 100 for t in gqa.layer_types)
    assert kv_cache_bytes(gqa, 100) == 2 * gqa.num_key_value_heads * gqa.head_dim * 2 * kept
