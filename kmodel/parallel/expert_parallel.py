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

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from kmodel.config import TrainConfig
from kmodel.model.moe import MoE
from kmodel.train.optim import adamw


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


def local_experts(num_experts: int, groups: Groups) -> tuple[int, int]:
    """(first global expert, count) this rank holds."""
    if num_experts % groups.ep_size:
        raise ValueError(f"expert_parallel_size ({groups.ep_size}) does not divide num_experts ({num_experts})")
    count = num_experts // groups.ep_size
    return groups.ep_rank * count, count


def attach_expert_parallel(model: nn.Module, groups: Groups) -> None:
    """Route every MoE layer's experts through the all-to-all; the model must hold this rank's shard
    (`build_model(..., experts=local_experts(...))`)."""
    for name, moe in ((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
        ep = ExpertParallel(groups, moe.cfg.num_experts)
        held = (moe.experts.first_expert, moe.experts.gate_up_proj.shape[0])
        if held != (ep.first, ep.local):
            raise ValueError(f"{name} holds experts [{held[0]}, {sum(held)}) but rank {groups.ep_rank} of the "
                             f"expert-parallel group owns [{ep.first}, {ep.first + ep.local})")
        moe.expert_parallel = ep


def gather_experts(tensor: torch.Tensor, groups: Groups) -> torch.Tensor:
    """A stacked expert tensor (or its moments, or its gradient) gathered from the expert-parallel group into
    global expert order (collective over the group)."""
    if groups.ep_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(groups.ep_size)]
    dist.all_gather(parts, tensor.contiguous(), group=groups.ep_group)
    return torch.cat(parts)


@torch.no_grad()
def synchronize_router_load(model: nn.Module, group=None) -> None:
    """Sum every MoE layer's token counts over the ranks so all of them take the same bias step."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        dist.all_reduce(moe.load, group=group)


@torch.no_grad()
def full_state_items(model: nn.Module, groups: Groups) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state in name order, one tensor at a time, every expert tensor gathered to full size in
    global expert order (collective: every rank of the group must consume it to the end)."""
    state = model.state_dict()
    for name in sorted(state):
        tensor = gather_experts(state[name], groups) if is_expert_param(name) else state[name]
        yield name, tensor.detach().cpu().contiguous()


def _accumulate_into(master: torch.Tensor, param: torch.Tensor) -> None:
    """Move a module parameter's freshly accumulated gradient into its fp32 master's gradient."""
    if master.grad is None:
        master.grad = param.grad.float()
    else:
        master.grad += param.grad
    param.grad = None


class ExpertOptimizer:
    """AdamW over this rank's expert shards, outside DeepSpeed: ZeRO would average their gradients over every
    rank (mixing different experts) and its start-up broadcast would overwrite them with rank 0's shard.

    fp32 master copies take the update (DeepSpeed casts the module's copies to bf16 for compute); every
    gradient accumulated on a module expert parameter moves into its master's fp32 gradient at once.
    Per optimizer step: `reduce_gradients` (collective) completes the average over the global batch and
    returns the experts' share of the global gradient norm; `step` applies the clipping factor the caller
    derived from the joint dense + expert norm, AdamW, and writes the masters back into the module."""

    def __init__(self, model: nn.Module, groups: Groups, train: TrainConfig):
        self.groups = groups
        named = [(n, p) for n, p in model.named_parameters() if is_expert_param(n)]
        self.params = [p for _, p in named]
        self.masters = [p.detach().float().clone().requires_grad_(p.requires_grad) for p in self.params]
        self.master_of = dict(zip(self.params, self.masters))
        self.adamw = adamw(((n, m) for (n, _), m in zip(named, self.masters)), train)
        for param, master in zip(self.params, self.masters):
            param.register_post_accumulate_grad_hook(partial(_accumulate_into, master))

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the masters into the module's parameters (cast to their dtype)."""
        for param, master in zip(self.params, self.masters):
            param.copy_(master)

    @torch.no_grad()
    def reduce_gradients(self) -> torch.Tensor:
        """Average the shards' gradients over the global batch and return the norm of all experts' gradients.

        A shard's gradient already sums its expert-parallel group's tokens (through the all-to-all backward),
        so it is summed over the expert-data-parallel group and divided by the world size. A master without a
        gradient contributes zeros, so every rank joins every collective."""
        squares = torch.zeros((), dtype=torch.float32, device=self.masters[0].device)
        for master in self.masters:
            if master.grad is None:
                master.grad = torch.zeros_like(master)
            dist.all_reduce(master.grad, group=self.groups.expert_dp_group)
            master.grad /= self.groups.world_size
            squares += master.grad.pow(2).sum()
        dist.all_reduce(squares, group=self.groups.ep_group)  # the other shards of the same experts' set
        return squares.sqrt()

    @torch.no_grad()
    def step(self, lr: float, clip_factor: float) -> None:
        """AdamW on gradients divided by `clip_factor` (>= 1), then the module gets the new weights."""
        for group in self.adamw.param_groups:
            group["lr"] = lr
        if clip_factor != 1.0:
            for master in self.masters:
                master.grad /= clip_factor
        self.adamw.step()
        self.write_back()

    def zero_grad(self) -> None:
        for param, master in zip(self.params, self.masters):
            param.grad = master.grad = None

    # --- topology-free state: full tensors in global expert order (collectives over the EP group) ---------
    def full_master(self, param: nn.Parameter) -> torch.Tensor:
        return gather_experts(self.master_of[param], self.groups)

    def full_moment(self, param: nn.Parameter, key: str) -> torch.Tensor:
        return gather_experts(self.adamw.state[self.master_of[param]][key], self.groups)

    def load_state(self, param: nn.Parameter, step: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
        """Restore the AdamW state of `param`'s shard: its rows of the moments."""
        master = self.master_of[param]
        self.adamw.state[master] = {
            "step": step.clone(),
            **{k: v.to(master.device, torch.float32).clone() for k, v in moments.items()},
        }
