"""Per-layer activation checkpointing: same loss, gradients and router counts as without it."""

from __future__ import annotations

import pytest
import torch

from kmodel.config import load_config
from kmodel.model import build_model
from kmodel.parallel.activation_checkpointing import apply_activation_checkpointing


def _run(checkpointed: bool):
    cfg = load_config("recipes/tiny-ko-moe.yaml", ["model.hidden_size=64", "model.num_hidden_layers=2", "data.seq_len=32"])
    model = build_model(cfg).train()
    if checkpointed:
        assert apply_activation_checkpointing(model) == 3  # two layers and the MTP block
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = model(ids, ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = {n: m.load.clone() for n, m in model.moe_layers().items()}
    return loss.detach(), grads, loads, model


def test_checkpointing_changes_nothing_but_memory():
    loss, grads, loads, _ = _run(False)
    ck_loss, ck_grads, ck_loads, model = _run(True)
    torch.testing.assert_close(ck_loss, loss)
    assert ck_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ck_grads[name], grads[name], msg=name)
    for name in loads:  # the recomputation in backward must not count tokens twice
        torch.testing.assert_close(ck_loads[name], loads[name], msg=name)
    assert model.state_dict().keys() == build_model(load_config("recipes/tiny-ko-moe.yaml", ["model.hidden_size=64", "model.num_hidden_layers=2"])).state_dict().keys()
    with pytest.raises(RuntimeError, match="already has activation checkpointing"):
        apply_activation_checkpointing(model)
