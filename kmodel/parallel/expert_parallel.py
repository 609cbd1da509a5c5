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
expert-data-parallel group and divided by W — the same average over the global batch. The sum is a
reduce-scatter: each of the W/P ranks of that group keeps, updates and stores (fp32 master, moments) only
its 1/(W/P) of every expert tensor, and all-gathers the updated weights (ExpertOptimizer).
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
from kmodel.parallel.mesh import Mesh
from kmodel.train.optim import adamw_over_groups, param_groups


@dataclass
class Groups:
    world_size: int  # ranks replicating this rank's part of the model: its pipeline stage (all, without pipelining)
    ep_size: int
    ep_rank: int  # position inside the expert-parallel group
    ep_group: dist.ProcessGroup
    expert_dp_group: dist.ProcessGroup


def make_groups(ep_size: int, built: dict[str, dist.ProcessGroup] | None = None) -> Groups:
    """The expert-parallel and expert-data-parallel groups of this rank, as `kmodel.parallel.mesh` lays them out
    (consecutive ranks of a stage, which may span context-parallel ranks): taken from `built`
    (`mesh.build_groups`, which made every group) or, without it, created here for a world of data and expert
    parallelism only (every rank must call this, in step)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size <= 0 or world % ep_size:
        raise ValueError(f"expert_parallel_size ({ep_size}) must divide the world size ({world})")
    if built is None:
        built = {}
        for kind in ("expert", "expert_data"):  # new_group is collective: all ranks create all groups in one order
            for ranks in Mesh(world, expert=ep_size).groups(kind):
                group = dist.new_group(ranks)
                if rank in ranks:
                    built[kind] = group
    # the ranks that replicate this rank's part of the model: one pipeline stage (the world without pipelining)
    stage = world if "replica" not in built else dist.get_world_size(built["replica"])
    return Groups(stage, ep_size, rank % ep_size, built["expert"], built["expert_data"])


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


def _sum_over_ranks(counts: torch.Tensor, tokens: int, group=None) -> tuple[torch.Tensor, int]:
    counts = counts.detach().clone()
    dist.all_reduce(counts, group=group)
    return counts, tokens * dist.get_world_size(group)


def attach_global_balance(model: nn.Module, group=None) -> None:
    """model.aux_loss_kind global: every MoE layer's balance loss counts expert loads over the micro-batches of
    all ranks of `group` (default: all; collective in every MoE forward), as Megatron's global aux loss."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.global_counts = partial(_sum_over_ranks, group=group)


@torch.no_grad()
def full_state_items(model: nn.Module, groups: Groups) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state in name order, one tensor at a time, every expert tensor gathered to full size in
    global expert order (collective: every rank of the group must consume it to the end)."""
    state = model.state_dict()
    for name in sorted(state):
        tensor = gather_experts(state[name], groups) if is_expert_param(name) else state[name]
        yield name, tensor.detach().cpu().contiguous()


class _Shard:
    """One stacked expert tensor of this rank's experts (`param`, `numel` elements) and the 1/D of it this rank
    owns in its expert-data-parallel group of D ranks: elements [start, start + size) of the flattened tensor,
    padded with zeros to D x size so every rank's piece has the same length."""

    def __init__(self, name: str, param: nn.Parameter, position: int, ranks: int):
        self.name, self.param = name, param
        self.numel = param.numel()
        self.size = -(-self.numel // ranks)
        self.start = position * self.size
        self.stop = min(self.start + self.size, self.numel)
        self.master = self.take(param.detach())  # fp32 master of the owned elements
        self.grad: torch.Tensor | None = None  # fp32, owned elements, reduced over the group

    def padded(self, full: torch.Tensor, ranks: int) -> torch.Tensor:
        flat = full.detach().reshape(-1).float()
        return torch.nn.functional.pad(flat, (0, ranks * self.size - self.numel))

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's owned elements of a full (local-shard) tensor, fp32, padded to `size`."""
        return self.pad(full.detach().reshape(-1)[self.start:self.stop])

    def pad(self, piece: torch.Tensor) -> torch.Tensor:
        """The owned elements (stop - start of them), fp32, padded to `size`, as a new tensor."""
        return torch.nn.functional.pad(piece.float(), (0, self.size - piece.numel())).clone()


class ExpertOptimizer:
    """The optimizer of this rank's expert shards, outside DeepSpeed (ZeRO would average their gradients over
    every rank, mixing different experts, and its start-up broadcast would overwrite them with rank 0's), with
    its state sharded the way ZeRO shards dense state: over the expert-data-parallel group (the D = W/P ranks
    holding the same experts), each rank owns 1/D of every stacked expert tensor.

      every rank   the module's expert weights (its E/P experts, compute dtype), as ZeRO-1/2 keep dense weights
      owned 1/D    fp32 master weights and the optimizer's moments (ZeRO >= 1); the reduced fp32 gradient
      gradients    reduce-scattered after a micro-batch's backward (`reduce_micro_batch`): ZeRO-1 after the
                   step's last one (earlier ones accumulate in the module's .grad), ZeRO-2 after every one,
                   so between micro-batches only the owned 1/D is kept — DeepSpeed's ZeRO-1/2 schedule

    Per optimizer step: `reduce_gradients` (collective) completes the average over the global batch and returns
    the experts' share of the global gradient norm; `step` divides by the clipping factor the caller derived from
    the joint dense + expert norm, updates the owned elements, and all-gathers the new weights into the module.
    The update rule is `self.optimizer` (kmodel.train.optim's AdamW; the engine swaps in
    kmodel.parallel.muon_zero.expert_muon under Muon); its groups are decided on the full tensors
    (`param_groups`: decay or not) and hold the owned fp32 pieces, so any elementwise rule applies unchanged."""

    def __init__(self, model: nn.Module, groups: Groups, train: TrainConfig, *, zero_stage: int = 1):
        if zero_stage not in (1, 2):
            raise ValueError(f"the expert optimizer shards like ZeRO-1 or ZeRO-2, not stage {zero_stage}")
        self.groups, self.zero_stage = groups, zero_stage
        self.dp_ranks = groups.world_size // groups.ep_size
        self.dp_position = dist.get_rank(groups.expert_dp_group)  # place in the group {i, i + P, i + 2P, ...}
        named = [(n, p) for n, p in model.named_parameters() if is_expert_param(n)]
        self.shards = [_Shard(n, p, self.dp_position, self.dp_ranks) for n, p in named]
        self.shard_of = {s.param: s for s in self.shards}
        param_groups_ = param_groups(named, train)
        for group in param_groups_:
            group["params"] = [self.shard_of[p].master for p in group["params"]]
        self.optimizer = adamw_over_groups(param_groups_, train)

    def __contains__(self, param: torch.Tensor) -> bool:
        return param in self.shard_of

    # --- gradients ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _reduce_into_owned(self, shard: _Shard) -> None:
        """Reduce-scatter the module gradient (zeros where autograd left none, so every rank joins) over the
        expert-data-parallel group; add this rank's piece to its fp32 gradient; free the full gradient."""
        full = shard.param.grad if shard.param.grad is not None else torch.zeros_like(shard.param)
        piece = shard.master.new_empty(shard.size)
        dist.reduce_scatter_tensor(piece, shard.padded(full, self.dp_ranks), group=self.groups.expert_dp_group)
        shard.grad = piece if shard.grad is None else shard.grad.add_(piece)
        shard.param.grad = None

    def reduce_micro_batch(self, last: bool) -> None:
        """After each micro-batch's backward (collective): ZeRO-2 (and ZeRO-1 at the step's `last` micro-batch)
        keeps only its owned, reduced gradient."""
        if self.zero_stage == 2 or last:
            for shard in self.shards:
                self._reduce_into_owned(shard)

    @torch.no_grad()
    def reduce_gradients(self) -> torch.Tensor:
        """Average the shards' gradients over the global batch and return the norm of all experts' gradients.

        A shard's gradient already sums its expert-parallel group's tokens (through the all-to-all backward),
        so it is summed over the expert-data-parallel group and divided by the world size. The owned pieces
        of all ranks partition every expert tensor once, so the norm is their squares summed over the world."""
        squares = torch.zeros((), dtype=torch.float32, device=self.shards[0].master.device)
        for shard in self.shards:
            if shard.grad is None:  # no micro-batch reduced (cannot happen in a step): zeros
                shard.grad = torch.zeros_like(shard.master)
            shard.grad /= self.groups.world_size
            squares += shard.grad.pow(2).sum()
        dist.all_reduce(squares)
        return squares.sqrt()

    # --- the update --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float, clip_factor: float) -> None:
        """The update on gradients divided by `clip_factor` (>= 1), then the module gets the new weights."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for shard in self.shards:
            shard.master.grad = shard.grad if clip_factor == 1.0 else shard.grad / clip_factor
        self.optimizer.step()
        self.write_back()

    @torch.no_grad()
    def write_back(self) -> None:
        """All-gather the owned master pieces over the expert-data-parallel group into the module's weights."""
        for shard in self.shards:
            shard.param.copy_(self._gather(shard, shard.master).view_as(shard.param))

    def zero_grad(self) -> None:
        for shard in self.shards:
            shard.param.grad = shard.grad = shard.master.grad = None

    def _gather(self, shard: _Shard, piece: torch.Tensor) -> torch.Tensor:
        """The full local-shard tensor (flattened, fp32) from every rank's owned piece (collective)."""
        full = piece.new_empty(self.dp_ranks * shard.size)
        dist.all_gather_into_tensor(full, piece.contiguous(), group=self.groups.expert_dp_group)
        return full[:shard.numel]

    # --- memory: bytes of what this rank holds -----------------------------------------------------------
    def held_bytes(self) -> dict[str, int]:
        """Module expert weights and their gradients as they are now; fp32 masters, reduced gradients and
        optimizer state of the owned pieces."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        state = [t for s in self.shards for t in self.optimizer.state.get(s.master, {}).values()
                 if isinstance(t, torch.Tensor) and t.ndim > 0]
        return {
            "params": sum(size(s.param) for s in self.shards),
            "grads": sum(size(s.param.grad) + size(s.grad) for s in self.shards),
            "optimizer": sum(size(s.master) for s in self.shards) + sum(size(t) for t in state),
        }

    # --- topology-free state: the pieces this rank owns, under global element positions ------------------
    def owned_range(self, param: nn.Parameter) -> tuple[int, int]:
        """Elements [begin, end) of the flattened global stacked tensor (every expert) whose fp32 master and
        optimizer state this rank holds: its piece of its expert-parallel rank's block of experts."""
        shard = self.shard_of[param]
        offset = self.groups.ep_rank * shard.numel  # the block of experts [ep_rank * E/P, (ep_rank + 1) * E/P)
        return offset + shard.start, offset + max(shard.stop, shard.start)

    def owned(self, param: nn.Parameter, key: str | None = None) -> torch.Tensor:
        """The fp32 master (`key` None) or an optimizer-state tensor of the owned range, unpadded (a view)."""
        shard = self.shard_of[param]
        piece = shard.master if key is None else self.optimizer.state[shard.master][key]
        return piece[:max(shard.stop - shard.start, 0)]

    def full_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The reduced gradient of all experts in global order (collective; after `reduce_gradients`)."""
        shard = self.shard_of[param]
        return gather_experts(self._gather(shard, shard.grad).view(param.shape), self.groups)

    def load_state(self, param: nn.Parameter, step: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Restore the optimizer state of `param`'s shard from the elements of the global state tensors in
        `owned_range` (read from a checkpoint of any layout)."""
        shard = self.shard_of[param]
        self.optimizer.state[shard.master] = {
            "step": step.clone(), **{k: shard.pad(v.to(shard.master.device)) for k, v in state.items()}
        }
