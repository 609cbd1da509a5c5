"""Expert parallelism over 2 gloo processes on CPU: EP=2 reproduces EP=1 losses and gradients, and a rank
whose experts receive no token neither hangs nor errors."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from launching import spawn_ranks

from kmodel.config import load_config
from kmodel.model import build_model
from kmodel.parallel import expert_parallel as xp

pytestmark = pytest.mark.distributed

WORLD = 2
OVERRIDES = ["data.seq_len=32", "parallel.backend=deepspeed", "parallel.world_size=2", "parallel.expert_parallel_size=2",
             "parallel.zero_stage=1"]


def _model(skew: bool, extra: list[str], groups: xp.Groups | None = None):
    """The tiny model, all experts, or this rank's shard of them routed through the all-to-all (`groups`)."""
    cfg = load_config("recipes/tiny-ko-moe.yaml", OVERRIDES + extra)
    if groups is None:
        model = build_model(cfg)
    else:
        model = build_model(cfg, experts=xp.local_experts(cfg.model.num_experts, groups))
        xp.attach_expert_parallel(model, groups)
    if skew:  # every token prefers experts 0..3, all held by rank 0: rank 1's experts stay idle
        for moe in model.moe_layers().values():
            moe.gate.e_score_correction_bias[:4] = 10.0
    return cfg, model.train()


def _batch(cfg):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.model.vocab_size, (2 * WORLD, cfg.data.seq_len), generator=g)
    return ids


def _worker(rank: int, world: int, skew: bool, extra: list[str], out: str) -> None:
    groups = xp.make_groups(2)
    cfg, model = _model(skew, extra, groups)
    ids = _batch(cfg).chunk(WORLD)[rank]
    experts = xp.ExpertOptimizer(model, groups, cfg.train)
    loss = model(ids, ids).loss
    loss.backward()
    experts.reduce_micro_batch(last=True)
    expert_norm = experts.reduce_gradients()
    grads = {}
    for name, param in model.named_parameters():
        if xp.is_expert_param(name):
            grads[name] = experts.full_grad(param)
        else:  # dense: the plain data-parallel average (DeepSpeed's job in the trainer)
            dist.all_reduce(param.grad)
            grads[name] = param.grad / WORLD
    xp.synchronize_router_load(model)
    loss = loss.detach()
    dist.all_reduce(loss)
    loads = {n: m.load.clone() for n, m in model.moe_layers().items()}
    if rank == 0:
        torch.save({"loss": loss / WORLD, "grads": grads, "loads": loads, "expert_norm": expert_norm}, out)


def _reference(skew: bool, extra: list[str]):
    """EP=1, one process: the mean of the two ranks' losses over the same global batch."""
    cfg, model = _model(skew, extra)
    halves = _batch(cfg).chunk(WORLD)
    total = sum(model(h, h).loss for h in halves) / WORLD
    total.backward()
    loads = {n: m.load.clone() for n, m in model.moe_layers().items()}
    return total.detach(), {n: p.grad for n, p in model.named_parameters()}, loads


GPT_OSS_EXPERTS = ["model.expert_bias=true", "model.expert_activation=clamped_swiglu"]


@pytest.mark.parametrize("skew, extra", [(False, []), (True, []), (False, GPT_OSS_EXPERTS)],
                         ids=["balanced", "idle-rank", "expert-biases"])
def test_ep2_matches_ep1(tmp_path, skew, extra):
    out = str(tmp_path / "ep2.pt")
    spawn_ranks(_worker, WORLD, skew, extra, out, timeout=150)

    got = torch.load(out, weights_only=True)
    loss, grads, loads = _reference(skew, extra)
    torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6)
    assert set(got["grads"]) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, load in loads.items():
        torch.testing.assert_close(got["loads"][name], load)
    expert_norm = torch.stack([g.norm() for n, g in grads.items() if xp.is_expert_param(n)]).norm()
    torch.testing.assert_close(got["expert_norm"], expert_norm, rtol=1e-5, atol=0)
    if skew:
        for load in loads.values():
            assert load[4:].sum() == 0 and load[:4].sum() > 0  # rank 1's experts really got nothing
