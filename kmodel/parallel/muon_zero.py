"""Muon on sharded state: each matrix orthogonalised once, on one owner rank, whatever holds its pieces.

ZeRO keeps a rank's share of the optimizer as flat fp32 partitions that cut through matrices (ZeRO-1/2: one
flat partition per parameter group, a contiguous 1/W of the group's concatenated parameters; ZeRO-3: 1/W of
every parameter, concatenated per sub-group); the expert optimizer keeps 1/D of each stacked expert tensor.
Momentum is elementwise, so each rank updates its own pieces of it in place (it stays in the optimizer state
under the parameter's flat partition, where DeepSpeed's safe_get/set_full_optimizer_state and the checkpoint
find it). Newton-Schulz needs whole matrices:

    all-to-all 1   every rank sends each piece of a direction to the owner of its matrix parameter
    owner          assembles its parameters, runs NS5 (kmodel.train.muon.orthogonalized: same-shape matrices
                   batched, e.g. all experts of a stacked tensor, all q_proj of the layers it owns)
    all-to-all 2   the update's pieces go back to the ranks that hold them

Each parameter has one owner (greedy by Newton-Schulz FLOPs, the same on every rank), so every matrix is
orthogonalised exactly once per step, and each element crosses the network twice (2 x 4 bytes per Muon
parameter per step, against an all-gather's W x). `attach_to_zero` wires this into DeepSpeed's ZeRO 1, 2 and
3 optimizers after deepspeed.initialize (ZeRO stage 0 leaves the parameters whole, so Muon needs nothing);
`expert_muon` is the expert optimizer's update rule under `train.optimizer: muon`, over its expert-data-parallel
group. `scale_master_rows` applies MuonClip's query/key rescale to ZeRO's fp32 masters and the module weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kmodel.config import TrainConfig
from kmodel.train.muon import Muon, QKClip, matrix_view, orthogonalized
from kmodel.train.optim import muon_over_groups, param_groups, uses_muon


@dataclass(frozen=True)
class Fragment:
    """Elements [start, start + numel) of matrix parameter `param` (flattened) held by `rank` (in the process
    group) at [offset, offset + numel) of its local tensor number `local`."""

    param: int
    rank: int
    local: int
    offset: int
    start: int
    numel: int


def assign_owners(views: list[tuple[int, int, int]], ranks: int) -> list[int]:
    """Owner rank of each parameter: largest Newton-Schulz cost first, each to the least loaded rank."""
    cost = [count * rows * cols * min(rows, cols) for count, rows, cols in views]
    load, owner = [0] * ranks, [0] * len(views)
    for i in sorted(range(len(views)), key=lambda i: (-cost[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[i], load[rank] = rank, load[rank] + cost[i]
    return owner


class ShardedMatrices:
    """The two exchanges around the owner's Newton-Schulz for one set of matrix parameters (see module doc)."""

    def __init__(self, views: list[tuple[int, int, int]], fragments: list[Fragment], group, ns_steps: int):
        self.views, self.group, self.ns_steps = views, group, ns_steps
        self.ranks, me = dist.get_world_size(group), dist.get_rank(group)
        self.numel = [count * rows * cols for count, rows, cols in views]
        covered = [0] * len(views)
        for f in fragments:
            covered[f.param] += f.numel
        if covered != self.numel:
            bad = next(i for i, n in enumerate(self.numel) if covered[i] != n)
            raise RuntimeError(f"Muon parameter {bad}: the ranks' pieces hold {covered[bad]} of {self.numel[bad]} elements")
        owner = assign_owners(views, self.ranks)
        self.owned = [i for i in range(len(views)) if owner[i] == me]
        order = sorted(fragments, key=lambda f: (f.param, f.start))
        self.sent = [[f for f in order if f.rank == me and owner[f.param] == o] for o in range(self.ranks)]
        self.received = [[f for f in order if f.rank == s and owner[f.param] == me] for s in range(self.ranks)]

    def _exchange(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        recv = send.new_empty(sum(recv_splits))
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        return recv

    def directions_to_updates(self, directions: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's local direction tensors -> its pieces of the orthogonalised, RMS-scaled updates (zeros
        where a local tensor holds no matrix element, e.g. ZeRO's padding)."""
        flat = [d.reshape(-1).float() for d in directions]
        device = flat[0].device if flat else torch.device("cpu")
        send_splits = [sum(f.numel for f in fs) for fs in self.sent]
        recv_splits = [sum(f.numel for f in fs) for fs in self.received]
        pieces = [flat[f.local][f.offset:f.offset + f.numel] for fs in self.sent for f in fs]
        send = torch.cat(pieces) if pieces else torch.zeros(0, device=device)
        recv = self._exchange(send, send_splits, recv_splits)

        full = {i: recv.new_zeros(self.numel[i]) for i in self.owned}
        position = 0
        for f in (f for fs in self.received for f in fs):
            full[f.param][f.start:f.start + f.numel] = recv[position:position + f.numel]
            position += f.numel
        done = dict(zip(self.owned, orthogonalized([full[i] for i in self.owned], [self.views[i] for i in self.owned],
                                                   self.ns_steps)))

        back = [done[f.param][f.start:f.start + f.numel] for fs in self.received for f in fs]
        returned = self._exchange(torch.cat(back) if back else recv.new_zeros(0), recv_splits, send_splits)
        updates = [torch.zeros_like(d) for d in flat]
        position = 0
        for f in (f for fs in self.sent for f in fs):
            updates[f.local][f.offset:f.offset + f.numel] = returned[position:position + f.numel]
            position += f.numel
        return updates


def _zero12_fragments(zero, group_index: int, params: list[torch.Tensor]) -> tuple[list[Fragment], object]:
    """Every rank's pieces of the group's parameters in ZeRO-1/2's flat partition (DeepSpeed's lp->hp links)."""
    process_group = zero.real_dp_process_group[group_index]
    mine = [(i, m.hp_fragment_address.start, m.lp_fragment_address.start, m.lp_fragment_address.numel)
            for i, p in enumerate(params) if (m := getattr(p, "_hp_mapping", None)) is not None]
    every = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(every, mine, group=process_group)
    return [Fragment(i, rank, 0, hp, lp, n) for rank, pieces in enumerate(every) for i, hp, lp, n in pieces], process_group


def _zero3_fragments(zero, params: list[torch.Tensor]) -> tuple[list[Fragment], object]:
    """Every rank's pieces of a ZeRO-3 sub-group's parameters: rank r holds elements [r*s, (r+1)*s) of each
    parameter (s its padded partition size), at the parameter's offset in the sub-group's flat partition."""
    process_group = zero.dp_process_group
    fragments = []
    for i, param in enumerate(params):
        _, offset, size = zero.grad_position[zero.get_param_id(param)]
        for rank in range(dist.get_world_size(process_group)):
            numel = min(size, param.ds_numel - rank * size)
            if numel > 0:
                fragments.append(Fragment(i, rank, 0, offset, rank * size, numel))
    return fragments, process_group


def attach_to_zero(zero, muon: Muon) -> int:
    """After deepspeed.initialize: give each of Muon's matrix groups, as ZeRO partitioned it, the exchange that
    orthogonalises whole matrices (collective over the data-parallel ranks). Returns the number of flat
    partitions wired (0 at ZeRO stage 0, whose parameters stay whole)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    wired = 0
    if isinstance(zero, DeepSpeedZeroOptimizer):
        for g, group in enumerate(muon.param_groups):
            if group["muon"]:
                params = zero.bit16_groups[g]
                fragments, process_group = _zero12_fragments(zero, g, params)
                flat = zero.single_partition_of_fp32_groups[g]
                muon.layouts[flat] = ShardedMatrices([muon.view_of[p] for p in params], fragments, process_group,
                                                     group["ns_steps"])
                wired += 1
    elif isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        for sub, params in enumerate(zero.fp16_groups):
            group = muon.param_groups[zero.sub_group_to_group_id[sub]]
            if group["muon"]:
                fragments, process_group = _zero3_fragments(zero, params)
                flat = zero.fp32_partitioned_groups_flat[sub]
                muon.layouts[flat] = ShardedMatrices([muon.view_of[p] for p in params], fragments, process_group,
                                                     group["ns_steps"])
                wired += 1
    elif any(p.ndim < 2 for g in muon.param_groups if g["muon"] for p in g["params"]):
        raise RuntimeError(f"Muon's matrices were flattened by {type(zero).__name__}, which kmodel cannot reassemble")
    return wired


def expert_muon(experts, train: TrainConfig) -> Muon:
    """Muon (and AdamW for the expert biases) over an ExpertOptimizer's owned pieces: every stacked expert tensor
    is flattened and cut into D equal pieces over the expert-data-parallel group, rank r holding elements
    [r * size, (r + 1) * size); each tensor's experts are orthogonalised, batched, on one rank of the group.
    The split is decided on the full tensors, as for the dense model."""
    matrices = [s for s in experts.shards if uses_muon(s.name, s.param, train)]
    others = [s for s in experts.shards if s not in matrices]
    groups = []
    if matrices:
        groups.append({"params": [s.master for s in matrices], "muon": True, "weight_decay": train.weight_decay,
                       "views": [matrix_view(s.name, tuple(s.param.shape)) for s in matrices]})
    master = {s.param: s.master for s in others}
    for group in param_groups([(s.name, s.param) for s in others], train):
        groups.append({**group, "params": [master[p] for p in group["params"]], "muon": False})
    muon = muon_over_groups(groups, train)
    if matrices:
        fragments = [Fragment(i, r, i, 0, r * s.size, min(s.size, s.numel - r * s.size))
                     for i, s in enumerate(matrices) for r in range(experts.dp_ranks) if s.numel > r * s.size]
        muon.layouts[matrices[0].master] = ShardedMatrices(groups[0]["views"], fragments,
                                                           experts.groups.expert_dp_group, train.muon_ns_steps)
    return muon


@torch.no_grad()
def scale_master_rows(zero, model: torch.nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """MuonClip's row factors applied where a ZeRO engine keeps the truth: the fp32 master (gathered whole,
    scaled, written back into this rank's partition) and the module's own weights (ZeRO-1/2: whole; ZeRO-3:
    this rank's partition). Collective: every rank passes the same `scales` (the logits are all-reduced)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    params = dict(model.named_parameters())
    if not any(hasattr(params[name], attr) for name in scales for attr in ("_hp_mapping", "ds_id")):
        QKClip.apply(model, scales)  # ZeRO stage 0: the module weights are the masters
        return
    for name in sorted(scales):
        param = params[name]
        full = safe_get_full_fp32_param(param)
        full.mul_(scales[name].to(full).view((-1,) + (1,) * (full.ndim - 1)))
        safe_set_full_fp32_param(param, full)
        if hasattr(param, "ds_id"):  # ZeRO-3: the module holds only its partition
            partition = param.ds_tensor
            rank = zero._get_param_partition_rank(param)
            piece = full.reshape(-1)[rank * partition.numel():(rank + 1) * partition.numel()]
            partition.data[:piece.numel()].copy_(piece)
            if param.data.numel() == full.numel():  # small ("persistent") parameters stay gathered between steps
                param.data.copy_(full.view_as(param.data))
        else:
            param.data.copy_(full)
