"""Distributed Muon: 4 CPU ranks under DeepSpeed ZeRO 0, 1, 2 and 3 take the same steps as one process
(relative 1e-5), with each matrix orthogonalised once on its owner rank; the one-process steps are checked to be
Muon's (flat spectrum), so no path can silently run SGD or AdamW instead."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from muon_checks import assert_muon_update
from muon_ranks import STEPS, config, global_batch

from kmodel.model import build_model
from kmodel.parallel.muon_zero import Fragment, ShardedMatrices, assign_owners
from kmodel.safe_path import python_command, safe_env
from kmodel.train.muon import matrix_view, orthogonalized
from kmodel.train.optim import build_optimizer, uses_muon

pytestmark = pytest.mark.distributed
HERE = Path(__file__).resolve().parent
WORLD = 4


def one_process(stage: int) -> list[dict]:
    """The same steps on one process: the whole global batch, torch's gradient clipping, kmodel's Muon."""
    cfg = config(stage, WORLD)
    model = build_model(cfg, "cpu")
    optimizer = build_optimizer(model, cfg.train)
    history = []
    for step in range(STEPS):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ids, labels = global_batch(cfg, step, WORLD)
        model(ids, labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        params = dict(model.named_parameters())
        history.append({
            "before": before,
            "weights": {n: p.detach().clone() for n, p in params.items()},
            "momenta": {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in params.items()
                        if uses_muon(n, p, cfg.train)},
        })
    return history


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def reference():
    return one_process(stage=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_four_ranks_take_the_one_process_muon_steps(stage, reference, tmp_path):
    out = tmp_path / "history.pt"
    command = python_command("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
                             str(HERE / "muon_ranks.py"), str(stage), str(out))
    env = safe_env({**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))})
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=400, cwd=HERE.parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    history = torch.load(out, weights_only=True)
    assert (history["wired"] > 0) == (stage > 0)  # ZeRO 1-3 flatten the matrices; the exchange is wired

    cfg = config(stage, WORLD)
    for step, (mine, ref) in enumerate(zip(history["steps"], reference, strict=True)):
        for name, expected in ref["weights"].items():
            assert relative(mine["weights"][name], expected) <= 1e-5, (step, name)
        assert mine["momenta"].keys() == ref["momenta"].keys()
        for name, expected in ref["momenta"].items():
            assert relative(mine["momenta"][name], expected) <= 1e-5, (step, name)
    first = reference[0]
    model = build_model(cfg, "meta", init=False)
    for name, param in model.named_parameters():
        if uses_muon(name, param, cfg.train):  # the reference itself is Muon: every matrix's update is flat
            assert_muon_update(first["before"][name], first["weights"][name], cfg.train.lr, cfg.train.weight_decay,
                               matrix_view(name, tuple(param.shape)))


def test_owners_balance_newton_schulz_work():
    views = [(8, 64, 32), (1, 64, 64), (1, 64, 64), (1, 32, 64), (16, 16, 32)]
    owners = assign_owners(views, 2)
    assert sorted(set(owners)) == [0, 1] and owners == assign_owners(views, 2)  # deterministic, both ranks used


def _exchange_rank(rank: int, world: int, port: int, results) -> None:
    """Pieces of 3 matrices scattered unevenly over 3 ranks: the exchange returns each rank its pieces of the
    one-process update."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    views = [(2, 6, 4), (1, 5, 7), (1, 3, 3)]
    full = [torch.randn(c * r * k) for c, r, k in views]
    expected = orthogonalized(full, views, steps=5)
    cuts = [(0, 20, 48), (0, 1, 35), (0, 9, 9)]  # rank 0 gets [0, a), rank 1 [a, b), rank 2 [b, end)
    fragments, local_len = [], [0] * world
    for i, (lo, a, b) in enumerate(cuts):
        for r, (start, stop) in enumerate(((lo, a), (a, b), (b, full[i].numel()))):
            if stop > start:
                fragments.append(Fragment(i, r, 0, local_len[r], start, stop - start))
                local_len[r] += stop - start
    mine = [f for f in fragments if f.rank == rank]
    local = torch.zeros(local_len[rank] + 3)  # trailing padding stays zero
    for f in mine:
        local[f.offset:f.offset + f.numel] = full[f.param][f.start:f.start + f.numel]
    [update] = ShardedMatrices(views, fragments, dist.group.WORLD, 5).directions_to_updates([local])
    ok = all(torch.allclose(update[f.offset:f.offset + f.numel], expected[f.param][f.start:f.start + f.numel], atol=1e-6)
             for f in mine) and bool((update[local_len[rank]:] == 0).all())
    results[rank] = ok
    dist.destroy_process_group()


def test_the_owner_exchange_reassembles_uneven_pieces():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_exchange_rank, args=(3, port, results), nprocs=3)
    assert dict(results) == {0: True, 1: True, 2: True}
