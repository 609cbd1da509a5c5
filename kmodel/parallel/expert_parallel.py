"""Expert parallelism for kmodel's MoE layer: experts sharded over a group, tokens exchanged by all-to-all.

Layout for world size W and EP size P: ranks [g*P, (g+1)*P) form expert-parallel group g and together hold
every routed expert once, rank r holding the E/P consecutive global experts starting at (r mod P) * E/P.
Ranks with the same position in their EP group ({i, i+P, i+2P, ...}) hold the same experts and form an
expert-data-parallel group of W/P ranks. Dense weights are replicated on all W ranks.

One MoE step on rank r (every rank calls every collective, even when no token picks its experts):
    permute       token copies grouped by global expert id, hence by destination rank
    all-to-all 1  the per-expert counts (E/P numbers to each rank), so every rank knows what it receives
    all-to-all 2  the token rows; received rows are regrouped by local expert
    grouped SwiGLU over the local experts
    all-to-all 3  the outputs back to the ranks the tokens came from (the inverse exchange)
    combine       weighted sum of each token's k expert outputs, exactly as without expert parallelism
Backward runs the two payload exchanges in reverse with the split sizes swapped.

Gradients: dense gradients are averaged over all W ranks; an expert shard's gradient already sums the
contributions of its EP group's tokens (through the all-to-all backward), so it is summed over the
expert-data-parallel group and divided by W — the same average over the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kmodel.model.moe import MoE


@dataclass
class Groups:
    world_size: int
    ep_size: int
    ep_rank: int  # position inside the expert-parallel group
    ep_group: dist.ProcessGroup
    expert_dp_group: dist.ProcessGroup


def make_groups(ep_size: int) -> Groups:
    """Create the expert-parallel and expert-data-parallel groups (every rank must call this, in step)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size <= 0 or world % ep_size:
        raise ValueError(f"expert_parallel_size ({ep_size}) must divide the world size ({world})")
    ep_group = expert_dp_group = None
    for g in range(world // ep_size):  # new_group is collective: all ranks create all groups in the same order
        ranks = list(range(g * ep_size, (g + 1) * ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for i in range(ep_size):
        ranks = list(range(i, world, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            expert_dp_group = group
    return Groups(world, ep_size, rank % ep_size, ep_group, expert_dp_group)


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits; backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


def _regroup(rows: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Rows in blocks sizes[a, b] (row-major over a, b) reordered to blocks in (b, a) order."""
    blocks = torch.split(rows, sizes.flatten().tolist())
    a, b = sizes.shape
    return torch.cat([blocks[i * b + j] for j in range(b) for i in range(a)])


class ExpertParallel:
    """The dispatch -> local experts -> combine path MoE.forward takes when its experts are sharded."""

    def __init__(self, groups: Groups, num_experts: int):
        if num_experts % groups.ep_size:
            raise ValueError(f"expert_parallel_size ({groups.ep_size}) does not divide num_experts ({num_experts})")
        self.groups = groups
        self.num_experts = num_experts
        self.local = num_experts // groups.ep_size
        self.first = groups.ep_rank * self.local

    def moe_experts(self, x, experts, weights, local_experts, kernel) -> torch.Tensor:
        """`local_experts`: the layer's Experts module holding this rank's shard (weights and biases)."""
        p, local, group = self.groups.ep_size, self.local, self.groups.ep_group
        x_sorted, order, counts = kernel.permute(x, experts, self.num_experts)
        send_counts = counts.view(p, local)  # [destination rank, its local expert]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)  # [source rank, my local expert]
        send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()

        received = _AllToAll.apply(x_sorted, send, recv, group)
        by_expert = _regroup(received, recv_counts)  # [my local expert, source rank]
        y = kernel.grouped_swiglu(
            by_expert,
            recv_counts.sum(0),
            local_experts.gate_up_proj,
            local_experts.down_proj,
            **local_experts.kernel_options(),
        )
        if y.shape[0] == 0:
            y = by_expert * 0  # keep the graph connected so backward still joins the exchange
        y = _regroup(y, recv_counts.t())  # back to [source rank, my local expert]
        returned = _AllToAll.apply(y, recv, send, group)
        return kernel.combine(returned, order, weights)


def is_expert_param(name: str) -> bool:
    return ".experts.gate_up_proj" in name or ".experts.down_proj" in name


def shard_experts(model: nn.Module, groups: Groups) -> None:
    """Keep only this rank's experts in every MoE layer and route its forward through the all-to-all."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        ep = ExpertParallel(groups, moe.cfg.num_experts)
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            full = getattr(moe.experts, name)
            if full is None:
                continue
            shard = full.detach()[ep.first : ep.first + ep.local].clone()
            setattr(moe.experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        moe.expert_parallel = ep


def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) parameters: separate optimizer groups, reduced over different process groups."""
    dense, expert = [], []
    for name, param in model.named_parameters():
        (expert if is_expert_param(name) else dense).append(param)
    return dense, expert


@torch.no_grad()
def reduce_gradients(model: nn.Module, groups: Groups) -> None:
    """Average gradients over the global batch: dense over all ranks, expert shards over the expert-data-
    parallel group (divided by the world size). A parameter without a gradient contributes zeros, so every
    rank joins every collective."""
    dense, expert = param_groups(model)
    for params, group in ((dense, None), (expert, groups.expert_dp_group)):
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)
            param.grad /= groups.world_size


@torch.no_grad()
def synchronize_router_load(model: nn.Module, group=None) -> None:
    """Sum every MoE layer's token counts over the ranks so all of them take the same bias step."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        dist.all_reduce(moe.load, group=group)


@torch.no_grad()
def full_state_dict(model: nn.Module, groups: Groups) -> dict[str, torch.Tensor]:
    """The model's state with every expert tensor gathered to full size, global expert order (topology-free)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if is_expert_param(name) and groups.ep_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(groups.ep_size)]
            dist.all_gather(parts, tensor.contiguous(), group=groups.ep_group)
            tensor = torch.cat(parts)
        state[name] = tensor.detach().cpu().contiguous()
    return state


def shard_state_dict(full: dict[str, torch.Tensor], groups: Groups) -> dict[str, torch.Tensor]:
    """This rank's slice of a full (topology-free) state dict: the inverse of full_state_dict."""
    state = {}
    for name, tensor in full.items():
        if is_expert_param(name):
            if tensor.shape[0] % groups.ep_size:
                raise ValueError(f"{name}: {tensor.shape[0]} experts cannot be split over {groups.ep_size} ranks")
            local = tensor.shape[0] // groups.ep_size
            tensor = tensor[groups.ep_rank * local : (groups.ep_rank + 1) * local]
        state[name] = tensor
    return state
