"""The sharded layout: ranks write the pieces they own (whole tensors, expert row blocks, flat ZeRO-style
partitions), one rank commits, and any reader gets the global tensors back, verified."""

from __future__ import annotations

import threading

import pytest
import torch

from kmodel.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    load_model,
    read_state,
    read_weights,
    save_checkpoint,
    split_moments,
    verify_checkpoint,
)
from kmodel.checkpoint.files import TensorStream
from kmodel.checkpoint.index import INDEX_FILE, PieceSpec, shard_file
from kmodel.checkpoint.sharded import ShardStream, balanced_owners, commit_sharded, prepare, write_rank
from kmodel.config import load_config
from kmodel.hashing import merkle_root
from kmodel.model import build_model
from kmodel.train.optim import build_optimizer

SMALL = ["model.vocab_size=101", "model.hidden_size=32", "model.head_dim=8", "model.intermediate_size=48",
         "model.moe_intermediate_size=16", "model.num_hidden_layers=2", "model.sliding_window_pattern=LG"]
WORLD = 4


@pytest.fixture(scope="module")
def trained():
    cfg = load_config("recipes/tiny-ko-moe.yaml", SMALL)
    model = build_model(cfg).train()
    optimizer = build_optimizer(model, cfg.train)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, ids).loss.backward()
    optimizer.step()
    return cfg, model, optimizer


def mixed_pieces(tensors: dict[str, torch.Tensor], rank: int, world: int) -> ShardStream:
    """Stacked expert tensors split by rows (expert parallelism), other matrices split as flat ranges of their
    elements (ZeRO partitions, boundaries anywhere), vectors owned whole by one rank."""
    pieces, values = [], []
    for i, (name, t) in enumerate(sorted(tensors.items())):
        shape, total = tuple(t.shape), t.numel()
        if ".experts." in name and shape[0] % world == 0:
            rows = shape[0] // world
            piece = PieceSpec.rows(name, t.dtype, shape, rank * rows, rows)
        elif t.ndim >= 2:
            bounds = [total * r // world + (r % 2) for r in range(world)] + [total]
            bounds[0] = 0
            piece = PieceSpec(name, t.dtype, shape, bounds[rank], bounds[rank + 1])
        elif i % world == rank:
            piece = PieceSpec(name, t.dtype, shape, 0, total)
        else:
            continue
        pieces.append(piece)
        values.append(t.reshape(-1)[piece.begin:piece.end])
    return ShardStream(pieces, iter(values))


def save_sharded(final, cfg, model, optimizer, step=3, world=WORLD, threads=True):
    state, moments = split_moments({"step": step, "optimizer": optimizer.state_dict()})
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moment_tensors = dict(zip([s[0] for s in moments.specs], moments.values))
    tmp = prepare(final)
    jobs = [threading.Thread(target=write_rank, args=(tmp, rank, world, {
        "model": mixed_pieces(weights, rank, world), "optimizer": mixed_pieces(moment_tensors, rank, world)}))
        for rank in range(world)]
    for job in jobs:
        job.start() if threads else job.run()
    manifest = commit_sharded(tmp, final, world, cfg, state=state, timeout=60)
    for job in jobs:
        if threads:
            job.join()
    return manifest


def test_sharded_checkpoint_reads_back_every_global_tensor_and_moment(tmp_path, trained):
    cfg, model, optimizer = trained
    final = tmp_path / "checkpoints" / "step_0000003"
    manifest = save_sharded(final, cfg, model, optimizer)
    assert {shard_file("model", r, WORLD) for r in range(WORLD)} <= set(manifest.files)
    shards = sorted(n for n in manifest.files if n.endswith(".safetensors"))
    assert manifest.tensor_root == merkle_root([manifest.files[n].sha256 for n in shards])
    assert verify_checkpoint(final, need_state=True).step == 3
    weights = read_weights(final)
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    experts = next(n for n in weights if ".experts." in n)
    lazy = read_weights(final, lazy=True)[experts]
    assert torch.equal(lazy.load(slice(2, 6)), model.state_dict()[experts][2:6])  # an EP rank of another size
    # a ZeRO partition or expert-optimizer piece of another layout: any element range, across piece boundaries
    for name in (experts, next(n for n, t in weights.items() if t.ndim == 2 and ".experts." not in n)):
        flat, total = model.state_dict()[name].reshape(-1), model.state_dict()[name].numel()
        for begin, end in ((0, total), (3, total // 2 + 5), (total // 4 - 1, total - 7)):
            assert torch.equal(read_weights(final, lazy=True)[name].load_flat(begin, end), flat[begin:end]), (name, begin)
    state = read_state(final)
    reference = optimizer.state_dict()["state"]
    for index, entry in reference.items():
        for key, value in entry.items():
            assert torch.equal(state["optimizer"]["state"][index][key], value), (index, key)
    assert latest_valid_checkpoint(tmp_path)[0] == final
    back = load_model(final)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("damage, reason", [
    (lambda c: c.joinpath(shard_file("model", 2, WORLD)).write_bytes(c.joinpath(shard_file("model", 2, WORLD)).read_bytes()[:-8]),
     "model-00002-of-00004.safetensors is truncated"),
    (lambda c: c.joinpath(INDEX_FILE).unlink(), "index.json is missing"),
    (lambda c: c.joinpath(shard_file("optimizer", 1, WORLD)).unlink(), "optimizer-00001-of-00004.safetensors is missing"),
])
def test_a_damaged_shard_or_index_is_named_and_skipped(tmp_path, trained, damage, reason):
    cfg, model, optimizer = trained
    save_sharded(tmp_path / "checkpoints" / "step_0000002", cfg, model, optimizer, step=2)
    final = tmp_path / "checkpoints" / "step_0000003"
    save_sharded(final, cfg, model, optimizer)
    damage(final)
    with pytest.raises(CheckpointError, match=reason):
        verify_checkpoint(final, need_state=True)
    found, skipped = latest_valid_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step_0000002" and reason.split(" ")[0] in skipped[0][1]


def test_a_flipped_byte_in_a_shard_is_refused_by_every_reader(tmp_path, trained):
    cfg, model, optimizer = trained
    final = tmp_path / "step_0000003"
    save_sharded(final, cfg, model, optimizer, threads=False)
    shard = final / shard_file("model", 1, WORLD)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    for read in (lambda: read_weights(final, lazy=True), lambda: load_model(final)):
        with pytest.raises(CheckpointError, match="model-00001-of-00004.safetensors does not match its recorded sha256"):
            read()
    read_state(final)  # the optimizer shards are intact and still read


def test_pieces_that_do_not_tile_a_tensor_are_refused_at_commit(tmp_path, trained):
    cfg, model, _ = trained
    name, tensor = next((n, t) for n, t in model.state_dict().items() if t.ndim == 2)
    tmp = prepare(tmp_path / "step_0000001")
    half = tensor.numel() // 2
    write_rank(tmp, 0, 2, {"model": ShardStream([PieceSpec(name, tensor.dtype, tuple(tensor.shape), 0, half)], iter([tensor.reshape(-1)[:half]]))})
    write_rank(tmp, 1, 2, {"model": ShardStream([PieceSpec(name, tensor.dtype, tuple(tensor.shape), half + 1, tensor.numel())],
                                                iter([tensor.reshape(-1)[half + 1:]]))})
    with pytest.raises(CheckpointError, match=f"{name}: the ranks' pieces leave a gap at element {half}"):
        commit_sharded(tmp, tmp_path / "step_0000001", 2, cfg, timeout=5)
    assert not (tmp_path / "step_0000001").exists()


def test_a_rank_that_never_writes_leaves_no_checkpoint(tmp_path, trained):
    cfg, model, _ = trained
    tmp = prepare(tmp_path / "step_0000001")
    write_rank(tmp, 0, 2, {"model": None})
    with pytest.raises(CheckpointError, match=r"ranks \[1\] did not finish writing"):
        commit_sharded(tmp, tmp_path / "step_0000001", 2, cfg, timeout=0.2)
    assert not (tmp_path / "step_0000001").exists()


def test_balanced_owners_spread_bytes(trained):
    _, model, _ = trained
    state = model.state_dict()
    owners = balanced_owners(TensorStream.of(state).specs, WORLD)
    loads = [sum(state[n].numel() * state[n].element_size() for n, r in owners.items() if r == rank) for rank in range(WORLD)]
    assert max(loads) - min(loads) <= max(t.numel() * t.element_size() for t in state.values())


def test_element_ranges_read_from_the_one_file_layout(tmp_path, trained):
    """A ZeRO rank restoring from a one-process checkpoint reads its partition's elements from whole tensors."""
    cfg, model, _ = trained
    save_checkpoint(tmp_path / "step_0000001", model, cfg)
    lazy = read_weights(tmp_path / "step_0000001", lazy=True)
    for name, tensor in model.state_dict().items():
        flat = tensor.reshape(-1)
        assert torch.equal(lazy[name].load_flat(flat.numel() // 3, flat.numel()), flat[flat.numel() // 3:]), name
