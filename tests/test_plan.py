"""The planner's arithmetic against hand-computed cases, the model it describes, and a measured CPU run."""

from __future__ import annotations

from pathlib import Path

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
    activation_elements_per_token,
    all_to_all_bytes_per_step,
    check_fits,
    make_plan,
    memory_per_gpu,
    model_flops_per_token,
    parameter_counts,
    with_parallel,
    zero_bytes_per_step,
)
from kmodel.train.flops import (
    attention_flops_per_token,
    mean_keys_seen,
    training_flops_per_token,
)

TINY = "recipes/tiny-ko-moe.yaml"
TINY_MLA = "recipes/tiny/deepseek-v3.yaml"
KEXAONE = "recipes/k-exaone-236b-a23b-multinode.yaml"
NO_PIPELINE = ["parallel.pipeline_parallel_size=1", "parallel.pipeline_schedule=1f1b", "parallel.pipeline_virtual_stages=1"]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"

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


# The same shape with multi-head latent attention, two layers (sliding window 4, then full) over 8 positions:
# 2 heads, low-rank query 4, latent 4, per head nope 2 + rope 2 = qk 4, value 3.
SMALL_MLA = {
    "model": {
        "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "attention_kind": "mla", "q_lora_rank": 4,
        "kv_lora_rank": 4, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2, "v_head_dim": 3, "qk_norm": False,
        "max_position_embeddings": 8, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
    },
    "train": {"micro_batch_size": 2, "grad_accum_steps": 3},
}


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [(TINY, []), (TINY, ["model.tie_word_embeddings=true", "model.norm_placement=sandwich"]),
     (TINY, ["model.num_nextn_predict_layers=0", "model.num_shared_experts=0", "model.qk_norm=false"]),
     (TINY_MLA, []), (TINY_MLA, ["model.q_lora_rank=null"]), ("recipes/tiny/ax-k1.yaml", []),
     ("recipes/tiny/vaetki.yaml", []), ("recipes/tiny/gpt-oss.yaml", [])],
)
def test_parameter_counts_match_the_model(recipe, overrides):
    cfg = load_config(recipe, overrides)
    model = build_model(cfg)
    counts = parameter_counts(cfg.model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)  # not shared_experts
    assert counts.expert == routed
    assert counts.active_expert == routed * cfg.model.num_experts_per_tok // cfg.model.num_experts



@pytest.mark.parametrize("recipe", [TINY, TINY_MLA, "recipes/tiny/gpt-oss.yaml", "recipes/tiny/ax-k1.yaml"])
def test_planned_flops_are_the_trainers(recipe):
    """Planner and training MFU use one formula: the plan's FLOPs per token (config counts) equal the trainer's
    (counted on the built model) up to norm weights and biases, which the trainer leaves out as non-matmul."""
    cfg = load_config(recipe)
    seq = cfg.data.seq_len if cfg.data is not None else 64
    planned, trained = model_flops_per_token(cfg.model, seq), training_flops_per_token(build_model(cfg), seq)
    assert planned == pytest.approx(trained, rel=2e-3)

@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_parameter_counts_match_full_scale_models_on_the_meta_device(recipe):
    """Every full-scale recipe (MLA: DeepSeek-V3, A.X K1, VAETKI) built without memory on the meta device."""
    from kmodel.model.decoder import Model

    cfg = load_config(RECIPES / recipe).model
    with torch.device("meta"):
        model = Model(cfg)
    counts = parameter_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.expert == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)


def test_deepseek_v3_latent_attention_parameters():
    cfg = load_config(RECIPES / "deepseek-v3-671b-a37b.yaml").model
    h, n, layers = 7168, 128, 61 + 1  # + the MTP block
    # q_a 7168x1536 + norm 1536 + q_b 1536x(128x192); kv_a 7168x(512+64) + norm 512 + kv_b 512x(128x256); o (128x128)x7168
    attention = h * 1536 + 1536 + 1536 * n * 192 + h * 576 + 512 + 512 * n * 256 + n * 128 * h
    assert attention == 187_107_328
    gqa_shaped = 4 * h * n * 192  # what q/k/v/o projections of 128 heads x 192 would hold
    assert parameter_counts(cfg).total == 682_636_472_320
    assert parameter_counts(cfg.model_copy(update={"attention_kind": "gqa"})).total - 682_636_472_320 == (
        layers * (gqa_shaped - attention)
    )


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
    # per token: attention 2*8 + (2+2)*4 + 2*4 = 40, MLP 2*8 + 4*16 = 80, final norm 16 -> 136 elements
    assert activation_bytes(cfg, element_bytes=2, fused_loss=True) == 2 * 4096 * 136 * 2
    # an unfused loss adds the fp32 logits (the backward recomputes the softmax): tokens * vocab * 4
    assert activation_bytes(cfg, element_bytes=2, fused_loss=False) == 2 * 4096 * (136 * 2 + 16 * 4)


def test_hand_computed_extra_norm_activations():
    """Output norms keep their input (the sublayer's output, hidden 8); their own output only feeds the residual add."""
    def small(**model):
        return config_from_dict({**SMALL, "model": {**SMALL["model"], **model}})

    # post: the projections read the residual stream (8) and the output norm keeps its input (8): as pre, 40 / 80
    assert activation_elements_per_token(small(norm_placement="post").model, False) == {"attention": 40, "mlp": 80}
    # sandwich (Peri-LN): input norm's input 8 + its output 8 + output norm's input 8 on each sublayer
    # attention 3*8 + q 2*4 + k 4 + v 4 + out 2*4 = 48; MLP 3*8 + 4*16 = 88; + final norm 16 -> 152 per token
    assert activation_elements_per_token(small(norm_placement="sandwich").model, False) == {"attention": 48, "mlp": 88}
    assert activation_bytes(small(norm_placement="sandwich"), element_bytes=2, fused_loss=True) == 2 * 4096 * 152 * 2

    # one MoE layer: 4 experts of 6, top-2, one shared expert. MLP part: norm in/out 2*8 = 16; routed 2 x (copy in 8
    # + gate/up 12 + product 6 + expert out 8) = 68; shared (plain SwiGLU) 4*6 = 24; router logits + scores
    # 2*4 fp32 = 16 -> 124
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 6, "num_shared_experts": 1}
    assert activation_elements_per_token(small(**moe).model, True)["mlp"] == 124
    # A.X K1's post_mlp_norm keeps the summed routed + shared output, 8 more
    assert activation_elements_per_token(small(**moe, post_mlp_norm=True).model, True)["mlp"] == 132
    # with sandwich as well, the layer's output norm keeps post_mlp_norm's output: 8 more again
    both = small(**moe, post_mlp_norm=True, norm_placement="sandwich").model
    assert activation_elements_per_token(both, True) == {"attention": 48, "mlp": 140}


def test_hand_computed_mla():
    cfg = config_from_dict(SMALL_MLA)
    m = cfg.model
    # attention: q_a 8*4=32 + its norm 4 + q_b 4*(2*(2+2))=32; kv_a 8*(4+2)=48 + latent norm 4 + kv_b 4*(2*(2+3))=40;
    # o (2*3)*8=48 -> 208. Layer: 208 + 2 norms 16 + MLP 3*8*16=384 = 608; 2 layers + embed 128 + head 128 + norm 8
    assert parameter_counts(m).total == 2 * 608 + 128 + 128 + 8 == 1480
    assert sum(p.numel() for p in build_model(cfg).parameters()) == 1480
    # full-rank query: q_proj 8*(2*4)=64 instead of 32 + 4 + 32 = 68
    full_q = config_from_dict({**SMALL_MLA, "model": {**SMALL_MLA["model"], "q_lora_rank": None}})
    assert parameter_counts(full_q.model).total == 1480 - 2 * 4 == 1472

    # activations per token: norm in/out 2*8=16, query latent + its norm 2*4=8, kv_a output (latent + RoPE key)
    # 4+2=6, normed latent 4, q 2*4=8, k 2*4=8, kv_b output (nope key + value) 2*(2+3)=10, attention out 2*3=6
    assert activation_elements_per_token(m, False) == {"attention": 66, "mlp": 2 * 8 + 4 * 16}
    assert activation_elements_per_token(full_q.model, False)["attention"] == 66 - 8
    # 2 tokens x 8 positions, 2 layers x (66 + 80) + final norm 16 = 308 elements per token, 2 bytes each
    assert activation_bytes(cfg, element_bytes=2, fused_loss=True) == 2 * 8 * 308 * 2

    # FLOPs per key: QK^T 2*2 heads*qk 4 = 16, PV 2*2 heads*v 3 = 12 -> 28. Keys a query sees: the sliding layer
    # min(i+1, 4) over i = 0..7 -> (1+2+3+4*5)/8 = 3.25, the full layer (1+...+8)/8 = 4.5
    assert attention_flops_per_token(m, 8) == 28 * (3.25 + 4.5) == 217
    # matmul parameters: all but the embedding lookup, 1480 - 128 = 1352
    assert model_flops_per_token(m, 8) == 3 * (2 * 1352 + 217)


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
    cfg = load_config(TINY, ["parallel.backend=deepspeed", "parallel.world_size=4", "parallel.expert_parallel_size=4",
                                "parallel.zero_stage=1"])
    # 3 sparse layers + the MTP block (sparse) = 4; 8*256 tokens, top-2, hidden 128, 2 bytes, 3/4 leave the rank,
    # 4 exchanges (dispatch + combine, forward + backward)
    expected = 4 * 4 * (8 * 256 * 2 * 128 * 2 * 3 / 4)
    assert all_to_all_bytes_per_step(cfg, 2) == expected


def test_plan_time_is_consistent():
    cfg = load_config(KEXAONE)  # a pipeline: a bubble
    plan = make_plan(cfg, Cluster(32))
    assert plan.fits
    assert plan.step_s == pytest.approx(plan.compute_s + plan.comm_s + plan.bubble_s)
    assert plan.bubble_s == pytest.approx(plan.bubble_fraction * max(s.busy_s for s in plan.stages)) and plan.bubble_s > 0
    assert plan.tokens_per_day == pytest.approx(plan.tokens_per_step / plan.step_s * 86400)
    assert 0 < plan.mfu < plan.assumptions.kernel_efficiency  # recompute and communication cost something
    assert plan.days == pytest.approx(plan.token_budget / plan.tokens_per_day)


def test_k_exaone_on_one_node_fails_with_a_suggestion():
    cfg = load_config(KEXAONE, ["parallel.world_size=8", "parallel.expert_parallel_size=8", "parallel.zero_stage=1",
                                *NO_PIPELINE])
    plan = make_plan(cfg, Cluster(1))
    with pytest.raises(PlanError, match=r"does not fit on 1 node.*over by [\d.]+ GiB; the largest category is optimizer.*--nodes \d+"):
        check_fits(plan, cfg)
    check_fits(make_plan(load_config(KEXAONE), Cluster(32)), load_config(KEXAONE))


def test_plan_cli(capsys):
    assert main(["plan", KEXAONE, "--nodes", "32"]) == 0
    out = capsys.readouterr().out
    for word in ("optimizer states", "activations", "EP all-to-all", "MFU", "tokens/day", "days", "fits: yes"):
        assert word in out
    no_pipeline = [arg for o in NO_PIPELINE for arg in ("--set", o)]
    assert main(["plan", KEXAONE, "--nodes", "1", "--set", "parallel.expert_parallel_size=8",
                 "--set", "parallel.zero_stage=1", *no_pipeline]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["plan", KEXAONE, "--nodes", "3", "--set", "parallel.expert_parallel_size=64",
                 "--set", "parallel.zero_stage=1", *no_pipeline]) == 2  # 24 GPUs: EP 64 does not divide them
    assert "expert_parallel_size (64) does not divide world_size (24)" in capsys.readouterr().err


def test_plan_cli_kv_cache_line_with_and_without_a_sliding_window(capsys):
    # tiny/qwen3-moe has no sliding window; tiny-ko-moe has 3 sliding layers (window 64) and 1 full, 1024 positions
    assert main(["plan", "recipes/tiny/qwen3-moe.yaml", "--nodes", "1", "--gpus-per-node", "1"]) == 0
    out = capsys.readouterr().out
    assert "GiB (no sliding-window layers: every layer keeps all 1024 positions)\n" in out
    assert "None" not in out and "sliding layers" not in out
    assert main(["plan", TINY, "--nodes", "1", "--gpus-per-node", "1"]) == 0
    assert "GiB (sliding layers (3) keep 64 positions, full layers (1) all 1024)\n" in capsys.readouterr().out
    # a window as long as the context keeps everything on sliding layers too
    assert main(["plan", TINY, "--nodes", "1", "--gpus-per-node", "1", "--set", "model.sliding_window=1024"]) == 0
    assert "(sliding layers (3) keep 1024 positions, full layers (1) all 1024)" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", [TINY, TINY_MLA])
def test_estimate_against_measured_cpu_peak(recipe):
    """fp32 tiny recipe, one AdamW step on CPU: weights, gradients and optimizer state measured exactly,
    activations as the bytes autograd keeps for backward (distinct storages) at the end of forward."""
    cfg = load_config(recipe)
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


def _kept_per_token(cfg, layer_idx, run):
    """fp32 elements per token that autograd keeps for backward while `run(layer, x, rope, positions)` runs on
    layer `layer_idx` of the recipe's model (Triton norm and attention kernels interpreted on CPU, as on GPU),
    counted by distinct storage, leaving out the weights and the RoPE tables (not per token)."""
    model = build_model(cfg).train()
    m, layer = cfg.model, model.layers[layer_idx]
    batch, seq = 1, 16
    positions = torch.arange(seq)
    rope = model.rope_tables(positions)[m.layer_types[layer_idx]]
    shared = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *rope)}
    saved: dict[int, int] = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(batch, seq, m.hidden_size, requires_grad=True, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        run(layer, x, rope, positions)
    return sum(n for ptr, n in saved.items() if ptr not in shared) / (batch * seq * 4)


def _attention_block(layer, x, rope, positions):
    layer.self_attn(layer.attn_in_norm(x), rope, positions)


@pytest.mark.parametrize("overrides", [[], ["model.q_lora_rank=null"]])
def test_mla_attention_activations_equal_what_the_fused_kernels_keep(overrides, monkeypatch):
    """The tensors autograd keeps for one MLA attention block (input norm + LatentAttention) with the fused norm and
    attention kernels the planner assumes (Triton, interpreted on CPU), counted by distinct storage: exactly the
    formula, plus the kernels' fp32 statistics (one rstd per norm and token, one log-sum-exp per head and token)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = load_config(TINY_MLA, ["kernels.attention=triton", "kernels.norm=triton", *overrides])
    m = cfg.model
    kept = _kept_per_token(cfg, 0, _attention_block)
    norms = 3 if m.q_lora_rank is not None else 2  # attention input, (query latent), key/value latent
    assert kept == activation_elements_per_token(m, False)["attention"] + norms + m.num_attention_heads


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("layer_idx", [0, 3])  # tiny-ko-moe: a sliding RoPE layer, the global NoPE layer
def test_gqa_attention_activations_equal_what_the_fused_kernels_keep(layer_idx, qk_norm, monkeypatch):
    """One GQA attention block (input norm + Attention) with the Triton norm and attention kernels: exactly the
    formula plus the kernels' fp32 statistics (input norm and per-head q/k norm rstd, per-head log-sum-exp)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qk = f"model.qk_norm={str(qk_norm).lower()}"
    cfg = load_config(TINY, ["kernels.attention=triton", "kernels.norm=triton", qk])
    m = cfg.model
    # hidden 128, 4 query heads and 2 key/value heads of 32: norm input + output 2*128 = 256, q 128, k 64, v 64,
    # attention output 128 -> 640; QK-norm keeps q and k once more before the norm (v has none): + 192 -> 832
    formula = activation_elements_per_token(m, False)["attention"]
    assert formula == (832 if qk_norm else 640)
    stats = 1 + (m.num_attention_heads + m.num_key_value_heads if qk_norm else 0) + m.num_attention_heads
    assert _kept_per_token(cfg, layer_idx, _attention_block) == formula + stats


def test_dense_mlp_activations_equal_what_autograd_keeps(monkeypatch):
    """tiny-ko-moe's first (dense) layer's MLP block, input norm included: norm input + output 2H and the SwiGLU's
    gate out, up out, silu(gate) and product 4I, plus the norm's fp32 rstd."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = load_config(TINY, ["kernels.norm=triton"])
    m = cfg.model
    formula = activation_elements_per_token(m, False)["mlp"]
    assert formula == 2 * m.hidden_size + 4 * m.intermediate_size
    assert _kept_per_token(cfg, 0, lambda layer, x, rope, positions: layer.mlp(layer.mlp_in_norm(x))) == formula + 1


@pytest.mark.parametrize("overrides", [["model.norm_placement=post"], ["model.norm_placement=sandwich"],
                                       ["model.post_mlp_norm=true"],
                                       ["model.norm_placement=sandwich", "model.post_mlp_norm=true"]])
def test_extra_norm_activations_equal_what_the_fused_kernels_keep(overrides, monkeypatch):
    """A whole MoE decoder layer of tiny-ko-moe measured with and without the extra norms (reference MoE kernel, whose
    kept bytes do not depend on the routing): the difference is the formula's difference plus one fp32 rstd per
    token for each norm added. The norm weights are plain (not 1 + w, which makes a per-call copy of the weight)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kmodel.model.norm import RMSNorm

    def measure(extra):
        cfg = load_config(TINY, ["kernels.attention=triton", "kernels.norm=triton", "kernels.moe=torch", *extra])
        norms = []

        def layer_forward(layer, x, rope, positions):
            norms.append(sum(isinstance(mod, RMSNorm) for mod in layer.modules()))  # q/k norms included
            layer(x, rope, positions)

        kept = _kept_per_token(cfg, 1, layer_forward)  # layer 1: the first MoE layer
        return cfg.model, norms[0], kept

    base_model, base_norms, base_kept = measure([])
    model, norms, kept = measure(overrides)
    formula = sum(activation_elements_per_token(model, True).values())
    base_formula = sum(activation_elements_per_token(base_model, True).values())
    h = model.hidden_size
    # by hand: 128 for each output norm added (post only moves the two norms: nothing added)
    added = (2 * h if model.norm_placement == "sandwich" else 0) + (h if model.post_mlp_norm else 0)
    assert formula - base_formula == added
    assert kept - base_kept == formula - base_formula + (norms - base_norms)


def test_plan_json_uses_the_trainers_memory_categories(capsys):
    import json

    from kmodel.train.memory import CATEGORIES

    ep64 = ["--set", "parallel.expert_parallel_size=64", "--set", "parallel.zero_stage=1",
            "--set", "train.micro_batch_size=1", "--set", "train.grad_accum_steps=4"]
    assert main(["plan", KEXAONE, "--nodes", "32", "--json", *ep64]) == 0
    plan = json.loads(capsys.readouterr().out)
    memory = plan["memory_bytes"]
    assert set(CATEGORIES) <= memory.keys() and memory["total"] == pytest.approx(sum(memory[c] for c in CATEGORIES))
    assert plan["fits"] and 0 < plan["mfu"] < 1
    assert plan["time_s"]["step_busiest_expert_1.5x"] > plan["time_s"]["step"] > plan["time_s"]["compute"]
    assert {"zero_dense", "zero_expert", "expert_all_to_all"} <= set(plan["communication_bytes"])


def test_k_exaone_expert_state_is_sharded_over_expert_data_parallel_ranks():
    """The recipe's EP 64 on 256 GPUs: each rank keeps 1/4 of its experts' fp32 masters and moments (the
    expert optimizer shards them over the 4 ranks holding the same experts); unsharded it would need ~99 GiB."""
    cfg = load_config(KEXAONE, ["parallel.expert_parallel_size=64", "parallel.zero_stage=1", "train.micro_batch_size=1",
                                "train.grad_accum_steps=4", *NO_PIPELINE])
    counts = parameter_counts(cfg.model)
    memory = make_plan(cfg, Cluster(32)).memory
    assert memory.optimizer == pytest.approx((counts.dense / 256 + counts.expert / 64 / 4) * 12)
    assert memory.total / 2**30 < 72
    unsharded = memory.total + counts.expert / 64 * 12 * (1 - 1 / 4)
    assert unsharded / 2**30 > 90  # over the 72 GiB usable


def test_search_ranks_layouts_that_fit_and_their_overrides_select_them():
    from kmodel.plan import search

    recipe = "recipes/moe-30b-a3b-multinode.yaml"
    cfg = load_config(recipe)
    found = search(cfg, Cluster(2))
    assert found and all(c.plan.fits for c in found)
    steps = [c.plan.step_s for c in found]
    assert steps == sorted(steps)
    assert any("parallel.zero_stage=3" in c.overrides for c in found)  # ZeRO-3 only without EP
    assert not any("parallel.zero_stage=3" in c.overrides and "parallel.expert_parallel_size=1" not in c.overrides
                   for c in found)
    for c in (found[0], found[-1]):  # the overrides reproduce the plan, with the recipe's global batch
        chosen = load_config(recipe, list(c.overrides))
        assert make_plan(chosen, Cluster(2)).step_s == pytest.approx(c.plan.step_s)
        assert chosen.train.micro_batch_size * chosen.train.grad_accum_steps * chosen.parallel.data_parallel_size == (
            cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.parallel.data_parallel_size)


AXK1_MULTINODE = "recipes/ax-k1-519b-a33b-multinode.yaml"
DEEPSEEK_MULTINODE = "recipes/deepseek-v3-671b-a37b-multinode.yaml"
LONG_32K = "recipes/k-exaone-long-context/32k.yaml"
LONG_256K = "recipes/k-exaone-long-context/256k.yaml"
# every multi-node recipe and the cluster its header states
STATED_CLUSTERS = [(KEXAONE, 32), ("recipes/moe-30b-a3b-multinode.yaml", 2), (AXK1_MULTINODE, 64),
                   (DEEPSEEK_MULTINODE, 64), (LONG_32K, 32), (LONG_256K, 32)]


@pytest.mark.parametrize("recipe, nodes", STATED_CLUSTERS)
def test_shipped_multinode_recipes_fit_their_stated_cluster(recipe, nodes):
    cfg = load_config(recipe)
    assert cfg.parallel.world_size == nodes * 8
    plan = make_plan(cfg, Cluster(nodes))
    check_fits(plan, cfg)
    assert plan.memory.total == max(stage.memory.total for stage in plan.stages)


@pytest.mark.parametrize("recipe, nodes", [r for r in STATED_CLUSTERS if r[0] != LONG_256K])
def test_shipped_multinode_recipes_use_the_best_plan_the_search_finds(recipe, nodes):
    from kmodel.plan import search

    cfg = load_config(recipe)
    best = search(cfg, Cluster(nodes))[0]
    assert make_plan(cfg, Cluster(nodes)).step_s == pytest.approx(best.plan.step_s)


def test_the_256k_stage_needs_context_parallelism_which_the_engine_runs():
    """At 256K tokens no layout without context parallelism fits 32 nodes; CP 16 does, and the engine runs it: its
    context parallelism splits MTP (the model's one depth), so the plan names no engine refusal."""
    from kmodel.plan import search

    cfg = load_config(LONG_256K)
    plan = make_plan(cfg, Cluster(32))
    assert plan.fits and cfg.parallel.context_parallel_size == 16
    assert cfg.model.num_nextn_predict_layers == 1 and plan.engine_refusal is None
    without_cp = [c for c in search(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"num_nextn_predict_layers": 0})}), Cluster(32)) if c.cfg.parallel.context_parallel_size == 1]
    assert without_cp == []


@pytest.mark.parametrize("recipe, base", [(AXK1_MULTINODE, "recipes/ax-k1-519b-a33b.yaml"),
                                          (DEEPSEEK_MULTINODE, "recipes/deepseek-v3-671b-a37b.yaml"),
                                          (LONG_32K, KEXAONE), (LONG_256K, KEXAONE)])
def test_stage_and_multinode_recipes_keep_their_models_architecture(recipe, base):
    """The same model as the base recipe; DeepSeek-V3's multi-node run trains with the ko-128k tokenizer, whose
    131,072 ids need a larger embedding than DeepSeek's own 129,280."""
    mine, theirs = load_config(recipe).model, load_config(base).model
    if recipe == DEEPSEEK_MULTINODE:
        assert mine.vocab_size == 131072 > theirs.vocab_size
        mine = mine.model_copy(update={"vocab_size": theirs.vocab_size})
    assert mine == theirs


def test_context_parallelism_halves_activations_and_exchanges_by_the_context_parallel_formulas():
    from kmodel.parallel.context_parallel import ContextLayout, gather_bytes, halo_bytes
    from kmodel.plan import context_bytes_per_step

    cfg = load_config(KEXAONE, [*NO_PIPELINE, "parallel.expert_parallel_size=1", "parallel.zero_stage=3",
                                "model.num_nextn_predict_layers=0"])
    one, two = (make_plan(with_parallel(cfg, 256, context_parallel_size=cp, grad_accum_steps=16 * cp), Cluster(32))
                for cp in (1, 2))
    assert two.memory.activations == one.memory.activations / 2
    assert (two.memory.params, two.memory.optimizer) == (one.memory.params, one.memory.optimizer)

    cp4 = with_parallel(cfg, 256, context_parallel_size=4, micro_batch_size=2, grad_accum_steps=3)
    row = 2 * (2 * 8 * 128) * 2  # micro-batch 2 x (keys + values: 8 kv heads x 128) x 2 bytes
    exchanges = 2 * 1.5 * 3  # forward and backward, the checkpointed forward again, 3 micro-batches
    # 8192 tokens in 8 chunks of 1024: rank 1 holds chunks 1 and 6, both after another rank's chunk; window 128
    assert cfg.model.window_of(0) == 128 and cfg.model.window_of(3) is None
    sliding = context_bytes_per_step(cp4, 2, [0])
    assert sliding["sliding"] == 2 * 127 * row * exchanges == halo_bytes(ContextLayout(8192, 4, 1), 128, row) * exchanges
    assert sliding["global"] == 0
    whole = context_bytes_per_step(cp4, 2, [3])["global"]
    assert whole == 3 * 2 * 1024 * row * exchanges == gather_bytes(ContextLayout(8192, 4, 0), row) * exchanges
    every = context_bytes_per_step(cp4, 2)
    assert every == {"sliding": 36 * sliding["sliding"], "global": 12 * whole}


def test_pipeline_bubble_stage_memory_and_point_to_point_follow_the_formulas():
    from kmodel.plan import tokens_per_rank

    cfg = load_config(AXK1_MULTINODE)
    plan = make_plan(cfg, Cluster(64))
    p, m = cfg.parallel.pipeline_parallel_size, cfg.train.grad_accum_steps
    assert plan.bubble_fraction == (p - 1) / m
    busiest = max(stage.busy_s for stage in plan.stages)
    assert plan.bubble_s == pytest.approx(plan.bubble_fraction * busiest)
    assert plan.step_s == pytest.approx(plan.compute_s + plan.comm_s + plan.bubble_s)
    assert [stage.in_flight for stage in plan.stages] == [p - i for i in range(p)]  # 1F1B
    # every stage holds its own layers' weights: together, the whole model once (EP 8 shards the experts)
    counts = parameter_counts(cfg.model)
    assert sum(stage.memory.params for stage in plan.stages) == pytest.approx((counts.dense + counts.expert / 8) * 2)
    assert sum(len(r) for stage in plan.stages for r in stage.layers) == 61
    # forward activations to the next stage and gradients back, hidden states plus the embeddings MTP reads
    assert plan.pipeline_bytes == 2 * m * tokens_per_rank(cfg) * 7168 * 2 * 2
    interleaved = make_plan(with_parallel(cfg, 512, pipeline_schedule="interleaved_1f1b", pipeline_virtual_stages=2),
                            Cluster(64))
    assert interleaved.bubble_fraction == (p - 1) / (2 * m)
    assert interleaved.pipeline_bytes == 2 * plan.pipeline_bytes


def test_bad_pipeline_layouts_are_plan_errors_with_numbers():
    cfg = load_config(AXK1_MULTINODE)
    with pytest.raises(PlanError, match=r"grad_accum_steps \(4 micro-batches\) is fewer than .*\(8\)"):
        make_plan(with_parallel(cfg, 512, grad_accum_steps=4), Cluster(64))
    with pytest.raises(PlanError, match=r"pipeline_layers \[30, 30, 1, 1, 1, 1, 1, 1\] sum to 66"):
        make_plan(with_parallel(cfg, 512, pipeline_layers=[30, 30, 1, 1, 1, 1, 1, 1]), Cluster(64))


@pytest.mark.slow
def test_search_ranges_over_pipeline_and_context_sizes_and_leaves_out_what_the_engine_refuses():
    from kmodel.plan import search

    recipe = "recipes/moe-30b-a3b-multinode.yaml"
    cfg = load_config(recipe)  # with MTP, which context parallelism splits
    found = search(cfg, Cluster(2))
    sizes = {(c.cfg.parallel.pipeline_parallel_size, c.cfg.parallel.context_parallel_size) for c in found}
    assert {p for p, _ in sizes} >= {1, 2, 4} and {c for _, c in sizes} >= {1, 2}
    assert all(p == 1 or c == 1 for p, c in sizes)  # the pipeline engine does not run CP yet
    assert all(c.cfg.parallel.zero_stage == 1 for c in found if c.cfg.parallel.pipeline_parallel_size > 1)
    # a needless context-parallel size is not preferred: where the same layout fits without it, that one is faster
    # (CP earns its place by what it saves in memory: here the best layout runs without activation checkpointing)
    compared = 0
    for c in found:
        cp = c.cfg.parallel.context_parallel_size
        if cp > 1:
            assert c.plan.context_bytes["global"] > 0 and c.plan.context_bytes["sliding"] > 0
        if cp > 1 and c.cfg.train.grad_accum_steps % cp == 0:
            plain = make_plan(with_parallel(c.cfg, 16, context_parallel_size=1,
                                            grad_accum_steps=c.cfg.train.grad_accum_steps // cp), Cluster(2))
            if plain.fits:
                compared += 1
                assert plain.step_s < c.plan.step_s
    assert compared


def test_plan_search_json_describes_each_layout(capsys):
    import json

    assert main(["plan", "recipes/moe-30b-a3b-multinode.yaml", "--nodes", "2", "--search", "--json"]) == 0
    layouts = json.loads(capsys.readouterr().out)
    assert len(layouts) > 1 and all(entry["fits"] for entry in layouts)
    for entry in layouts:
        parallel, sets = entry["parallel"], entry["set"]
        assert f"parallel.expert_parallel_size={parallel['expert_parallel_size']}" in sets
        assert f"train.micro_batch_size={parallel['micro_batch_size']}" in sets


def test_zero3_with_expert_parallelism_is_refused_with_the_best_alternative(capsys):
    assert main(["plan", KEXAONE, "--nodes", "32", "--set", "parallel.zero_stage=3",
                 "--set", "parallel.expert_parallel_size=64"]) == 2
    captured = capsys.readouterr()
    assert "zero_stage 3 with expert_parallel_size > 1 is refused" in captured.err
    assert "the fastest layout that fits on this cluster: --set parallel.world_size=256" in captured.err
    assert "layouts of k-exaone-236b-a23b-multinode fit on 256 GPUs" in captured.out


def test_a_misfitting_pipeline_is_offered_the_split_that_fits_the_memory():
    """With 56 GiB usable, the cost model's split of A.X K1 (9 layers on stages 5 and 6) is 1.3 GiB over; the
    memory-bounded split (kmodel.parallel.pipeline_split with memory_limit) is suggested, and it fits."""
    cfg = load_config(AXK1_MULTINODE)
    tight = Assumptions.for_config(cfg, memory_headroom=0.7)
    plan = make_plan(cfg, Cluster(64), tight)
    assert not plan.fits
    with pytest.raises(PlanError, match=r"parallel\.pipeline_layers=\[([\d,]+)\]") as error:
        check_fits(plan, cfg)
    counts = [int(n) for n in error.value.args[0].split("parallel.pipeline_layers=[")[1].split("]")[0].split(",")]
    assert sum(counts) == 61 and len(counts) == 8
    bounded = make_plan(with_parallel(cfg, 512, pipeline_layers=counts), Cluster(64), tight)
    assert bounded.fits
