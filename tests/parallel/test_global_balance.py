"""Global-batch load balancing over 2 gloo processes on CPU: with model.aux_loss_kind global the balance loss
counts expert loads over both ranks' micro-batches, so the ranks' mean loss (and its gradient) equals one
process's loss on the union of their rows, where per-micro-batch balancing does not."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from launching import spawn_ranks

from kmodel.config import load_config
from kmodel.model import build_model
from kmodel.parallel import expert_parallel as xp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
BALANCE = ["data.seq_len=32", "model.aux_loss_coef=0.5", "model.router_bias_update_rate=0"]


def _model(kind: str):
    cfg = load_config("recipes/tiny-ko-moe.yaml", BALANCE + [f"model.aux_loss_kind={kind}"])
    return cfg, build_model(cfg).train()


def _batch(cfg) -> torch.Tensor:
    return torch.randint(0, cfg.model.vocab_size, (2 * WORLD, cfg.data.seq_len), generator=torch.Generator().manual_seed(3))


def _aux_and_router_grad(model, ids):
    out = model(ids, ids)
    out.aux_loss.backward()
    return out.aux_loss.detach(), model.layers[1].mlp.gate.weight.grad.clone()


def _worker(rank: int, world: int, kind: str, out: str) -> None:
    cfg, model = _model(kind)
    if kind == "global":  # as the engine: the hook sums counts over the ranks it is given, whatever the kind
        xp.attach_global_balance(model)
    aux, grad = _aux_and_router_grad(model, _batch(cfg).chunk(WORLD)[rank])
    for t in (aux, grad):  # the data-parallel mean, as the engine averages losses and gradients
        dist.all_reduce(t)
        t /= WORLD
    if rank == 0:
        torch.save({"aux": aux, "grad": grad}, out)


def _run(tmp_path, kind: str) -> dict[str, torch.Tensor]:
    out = str(tmp_path / f"{kind}.pt")
    spawn_ranks(_worker, WORLD, kind, out, timeout=150)
    return torch.load(out, weights_only=True)


def test_global_balance_loss_equals_one_process_on_the_global_batch(tmp_path):
    cfg, model = _model("batch")
    aux, grad = _aux_and_router_grad(model, _batch(cfg))  # one process, one micro-batch of both ranks' rows
    got = _run(tmp_path, "global")
    torch.testing.assert_close(got["aux"], aux, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["grad"], grad, rtol=1e-5, atol=1e-9)
    per_rank = _run(tmp_path, "batch")  # each rank balances its own micro-batch: a different loss
    assert abs(per_rank["aux"] - aux) > 1e-4 * aux
