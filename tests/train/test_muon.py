"""Muon on one process: Newton-Schulz, the update rule, the parameter split, decoupled decay, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from muon_checks import assert_muon_update
from safetensors import safe_open

from kmodel.checkpoint import list_checkpoints
from kmodel.config import ConfigError, TrainConfig
from kmodel.model import build_model
from kmodel.train import Trainer
from kmodel.train.metrics import read_metrics
from kmodel.train.muon import Muon, matrix_view, newton_schulz, orthogonalized
from kmodel.train.optim import build_optimizer, uses_muon


def muon_train(**overrides) -> TrainConfig:
    return TrainConfig(optimizer="muon", **overrides)


def test_newton_schulz_flattens_the_spectrum_for_wide_tall_and_batched_matrices():
    torch.manual_seed(0)
    g = torch.randn(3, 24, 40) @ torch.diag(torch.logspace(-2, 0, 40))  # a spread-out spectrum
    o = newton_schulz(g, steps=5)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25  # Keller Jordan's quintic: roughly [0.7, 1.2], not exactly 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cosine = (o * (u @ vh)).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * (u @ vh).norm(dim=(-2, -1)))
    assert (cosine > 0.95).all()  # it approximates U V^T
    torch.testing.assert_close(newton_schulz(g.mT, steps=5), o.mT, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(newton_schulz(g[1], steps=5), o[1], rtol=1e-5, atol=1e-6)


def test_expert_gate_up_is_two_matrices_per_expert_and_same_shapes_batch():
    assert matrix_view("layers.1.mlp.experts.gate_up_proj", (8, 192, 128)) == (16, 96, 128)
    assert matrix_view("layers.1.mlp.experts.down_proj", (8, 128, 96)) == (8, 128, 96)
    assert matrix_view("layers.0.self_attn.q_proj.weight", (128, 64)) == (1, 128, 64)
    torch.manual_seed(1)
    gate_up, down = torch.randn(4, 12, 8), torch.randn(6, 8)
    views = [matrix_view("m.experts.gate_up_proj", gate_up.shape), (1, 6, 8)]
    batched = orthogonalized([gate_up, down], views, steps=5)
    alone = [orthogonalized([m], [(1, 6, 8)], steps=5)[0] for m in gate_up.reshape(8, 6, 8)]
    torch.testing.assert_close(batched[0], torch.cat(alone), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[1], orthogonalized([down], [(1, 6, 8)], steps=5)[0], rtol=1e-5, atol=1e-6)


def test_the_standard_split_and_its_overrides(tiny):
    model = build_model(tiny("train.optimizer=muon"), "cpu")
    train_cfg = muon_train()
    chosen = {n for n, p in model.named_parameters() if uses_muon(n, p, train_cfg)}
    assert "layers.0.self_attn.q_proj.weight" in chosen and "layers.1.mlp.experts.gate_up_proj" in chosen
    assert "layers.0.mlp.gate_proj.weight" in chosen and "layers.1.mlp.shared_experts.down_proj.weight" in chosen
    for name in ("embed_tokens.weight", "lm_head.weight", "layers.1.mlp.gate.weight", "norm.weight"):
        assert name not in chosen
    moved = muon_train(muon_params=["*.mlp.gate.weight"], adamw_params=["layers.0.*"])
    chosen = {n for n, p in model.named_parameters() if uses_muon(n, p, moved)}
    assert "layers.1.mlp.gate.weight" in chosen and not any(n.startswith("layers.0.") for n in chosen)

    partitioned = torch.nn.Parameter(torch.empty(0))  # a ZeRO-3 parameter built under zero.Init: 1-D, ds_shape kept
    partitioned.ds_shape = (64, 32)
    assert uses_muon("layers.0.self_attn.o_proj.weight", partitioned, train_cfg)  # Muon stays on under ZeRO-3

    optimizer = build_optimizer(model, muon_train())
    assert isinstance(optimizer, Muon)
    [muon_group] = [g for g in optimizer.param_groups if g["muon"]]
    assert muon_group["weight_decay"] == 0.1 and len(muon_group["params"]) == len(muon_group["views"])
    assert isinstance(build_optimizer(model, TrainConfig()), torch.optim.AdamW)  # adamw stays the default


def test_a_step_applies_nesterov_muon_with_rms_matched_scale_and_decoupled_decay():
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(16, 48))
    lr, wd, mu = 0.05, 0.1, 0.95
    opt = Muon([{"params": [w], "muon": True, "views": [(1, 16, 48)], "weight_decay": wd}],
               lr=lr, momentum=mu, nesterov=True, ns_steps=5, betas=(0.9, 0.95), eps=1e-8)
    g1, g2 = torch.randn(16, 48), torch.randn(16, 48)
    for g in (g1, g2):
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        assert_muon_update(before, w.detach(), lr, wd, (1, 16, 48))
    buffer = mu * g1 + g2
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buffer)
    expected = before * (1 - lr * wd) - lr * 0.2 * math.sqrt(48) * newton_schulz(g2 + mu * buffer, 5)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    update_rms = ((before * (1 - lr * wd) - w.detach()) / lr).pow(2).mean().sqrt()
    assert 0.14 < update_rms < 0.25  # AdamW's typical update RMS

    z = torch.nn.Parameter(torch.ones(4, 4))  # no gradient signal: only the decoupled decay acts
    opt = Muon([{"params": [z], "muon": True, "views": [(1, 4, 4)], "weight_decay": wd}],
               lr=lr, momentum=mu, nesterov=True, ns_steps=5, betas=(0.9, 0.95), eps=1e-8)
    z.grad = torch.zeros(4, 4)
    opt.step()
    torch.testing.assert_close(z.detach(), torch.full((4, 4), 1 - lr * wd))


def test_adamw_groups_inside_muon_match_torch_adamw():
    torch.manual_seed(3)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    mine = Muon([{"params": [a], "muon": False, "weight_decay": 0.1}], lr=1e-2, momentum=0.95, nesterov=True,
                ns_steps=5, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([{"params": [b], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    b.data.copy_(a.data)
    for _ in range(3):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert set(mine.state[a]) == set(ref.state[b])  # same checkpoint layout as AdamW


def _comparable(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"], json.dumps(r.get("attention_logits")))
            for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.mark.slow
def test_muon_trains_and_resumes_bit_exactly(tiny, tmp_path):
    cfg = tiny("train.optimizer=muon", "train.max_steps=8", "train.eval_every=0", "train.lr=2e-2",
               "provenance.ledger=false")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    Trainer(cfg, straight, progress=False).fit()
    Trainer(cfg, resumed, progress=False).fit(max_steps=4)
    second = Trainer(cfg, resumed, progress=False)
    second.restore(list_checkpoints(resumed)[-1])
    assert isinstance(second.optimizer, Muon) and second.step == 4
    second.fit()
    assert _comparable(resumed) == _comparable(straight)
    losses = [r[1] for r in _comparable(straight)]
    assert losses[-1] < losses[0] - 0.5
    with safe_open(str(list_checkpoints(straight)[-1] / "optimizer.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".momentum_buffer") for k in keys) and any(k.endswith(".exp_avg_sq") for k in keys)


def test_muon_with_optimizer_offload_is_refused_by_name(tiny):
    with pytest.raises(ConfigError, match="parallel.offload_optimizer"):
        tiny("train.optimizer=muon", "parallel.backend=deepspeed", "parallel.world_size=2", "parallel.zero_stage=2",
             "parallel.offload_optimizer=true")


def test_the_planner_counts_muon_state_flops_and_exchange(tiny):
    from kmodel.plan import (
        Assumptions,
        Cluster,
        make_plan,
        memory_per_gpu,
        newton_schulz_flops_per_gpu,
    )

    cfg = tiny("train.optimizer=muon", "train.device=cpu")
    model = build_model(cfg, "cpu")
    optimizer = build_optimizer(model, cfg.train)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.ndim)
    assume = Assumptions.for_config(cfg)  # fp32, one process: 8 optimizer bytes per parameter under AdamW
    planned = memory_per_gpu(cfg, 1, assume, fused_loss=False).optimizer
    adamw_planned = memory_per_gpu(tiny("train.device=cpu"), 1, assume, fused_loss=False).optimizer
    matrices = sum(p.numel() for n, p in model.named_parameters() if uses_muon(n, p, cfg.train))
    assert planned == pytest.approx(measured, rel=0.01)
    assert adamw_planned - planned == pytest.approx(4 * matrices, rel=0.02)  # one fp32 momentum, not two moments

    distributed = tiny("train.optimizer=muon", "parallel.backend=deepspeed", "parallel.world_size=8",
                       "parallel.zero_stage=2", "train.micro_batch_size=1")
    plan = make_plan(distributed, Cluster(nodes=1, gpus_per_node=8))
    assert plan.newton_schulz_flops == pytest.approx(newton_schulz_flops_per_gpu(distributed, 1) / 8)
    assert plan.muon_exchange_bytes > 0
    assert make_plan(tiny("parallel.backend=deepspeed", "parallel.world_size=8", "parallel.zero_stage=2",
                          "train.micro_batch_size=1"), Cluster(nodes=1, gpus_per_node=8)).muon_exchange_bytes == 0
