"""Checkpoint files written tensor by tensor and read back one tensor (or a block of rows) at a time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kmodel.checkpoint import (
    OPTIMIZER_FILE,
    CheckpointError,
    TensorStream,
    load_weights_into,
    read_state,
    read_weights,
    save_checkpoint,
    write_safetensors,
)
from kmodel.config import load_config
from kmodel.hashing import object_sha256
from kmodel.model import build_model
from kmodel.train.optim import build_optimizer

SMALL = ["model.vocab_size=101", "model.hidden_size=32", "model.head_dim=8", "model.intermediate_size=48",
         "model.moe_intermediate_size=16", "model.num_hidden_layers=2", "model.sliding_window_pattern=LG"]


def test_streamed_file_is_standard_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "a.scale": torch.tensor(2.5),
        "c.mask": torch.tensor([True, False, True]),
        "d.ids": torch.arange(7, dtype=torch.int64).view(7, 1),
        "e.empty": torch.zeros(0, 4),
    }
    write_safetensors(tmp_path / "x.safetensors", TensorStream.of(tensors))
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_a_stream_that_breaks_its_header_is_refused(tmp_path):
    specs = [("w", torch.float32, (2, 2)), ("v", torch.float32, (3,))]
    with pytest.raises(CheckpointError, match=r"v should be torch.float32 \(3,\), got torch.float32 \(4,\)"):
        write_safetensors(tmp_path / "x.safetensors", TensorStream(specs, iter([torch.zeros(2, 2), torch.zeros(4)])))
    with pytest.raises(CheckpointError, match="v should be .* got nothing"):
        write_safetensors(tmp_path / "y.safetensors", TensorStream(specs, iter([torch.zeros(2, 2)])))
    with pytest.raises(CheckpointError, match="more tensors than the header lists"):
        write_safetensors(tmp_path / "z.safetensors", TensorStream(specs[:1], iter([torch.zeros(2, 2), torch.zeros(3)])))


def _trained(cfg):
    model = build_model(cfg).train()
    optimizer = build_optimizer(model, cfg.train)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, ids).loss.backward()
    optimizer.step()
    return model, optimizer


def test_moments_live_in_their_own_file_and_merge_back(tmp_path):
    cfg = load_config("recipes/tiny-ko-moe.yaml", SMALL)
    model, optimizer = _trained(cfg)
    state = {"step": 1, "optimizer": optimizer.state_dict()}
    save_checkpoint(tmp_path / "step_0000001", model, cfg, state=state)
    ckpt = tmp_path / "step_0000001"
    assert (ckpt / OPTIMIZER_FILE).is_file()
    on_disk = torch.load(ckpt / "state.pt", weights_only=True)
    assert all(set(entry) == {"step"} for entry in on_disk["optimizer"]["state"].values())  # moments moved out
    full, lazy = read_state(ckpt), read_state(ckpt, lazy=True)
    assert object_sha256(full) == object_sha256(lazy) == object_sha256(state)  # hashing reads lazily, same hash
    fresh = build_optimizer(model, cfg.train)
    fresh.load_state_dict(full["optimizer"])
    for param in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.state[param][key], optimizer.state[param][key])


def test_lazy_load_reads_a_block_of_expert_rows(tmp_path):
    cfg = load_config("recipes/tiny-ko-moe.yaml", SMALL)
    model, _ = _trained(cfg)
    save_checkpoint(tmp_path / "step_0000001", model, cfg)
    count = cfg.model.num_experts // 2
    shard = build_model(cfg, experts=(count, count), init=False)
    rows = slice(count, 2 * count)
    load_weights_into(shard, read_weights(tmp_path / "step_0000001", lazy=True), "ckpt",
                      rows=lambda name: rows if ".experts." in name else None)
    full = model.state_dict()
    for name, tensor in shard.state_dict().items():
        assert torch.equal(tensor, full[name][rows] if ".experts." in name else full[name]), name
    with pytest.raises(CheckpointError, match=r"experts.gate_up_proj: checkpoint \(8, 32, 32\) vs model \(4, 32, 32\)"):
        load_weights_into(shard, read_weights(tmp_path / "step_0000001", lazy=True), "ckpt")


def test_a_corrupt_optimizer_file_is_named(tmp_path):
    cfg = load_config("recipes/tiny-ko-moe.yaml", SMALL)
    model, optimizer = _trained(cfg)
    save_checkpoint(tmp_path / "step_0000001", model, cfg, state={"optimizer": optimizer.state_dict()})
    (tmp_path / "step_0000001" / OPTIMIZER_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match="optimizer.safetensors is truncated"):
        read_state(tmp_path / "step_0000001")
