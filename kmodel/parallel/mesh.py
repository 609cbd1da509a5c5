"""Which rank does what: the one owner of rank coordinates and process groups.

world = PP x DP x CP. Rank r is context-parallel rank r % CP (consecutive ranks share a sequence, so the densest
traffic stays inside a node), data-parallel rank (r // CP) % DP and pipeline stage r // (CP x DP) (stages
outermost: they may span nodes). Expert parallelism lives inside one stage: the stage's DP x CP ranks, in rank
order, form groups of EP consecutive ranks that each hold all experts once; the ranks holding the same experts in
one stage form the expert-data-parallel group. Dense weights are replicated over the stage's DP x CP ranks, so
their gradients are reduced over that `replica` group.

`Mesh` is pure arithmetic (no torch.distributed), so the planner, tests and launchers can use it anywhere;
`build_groups` creates every process group once, in one fixed order on every rank (new_group is collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("context", "data", "replica", "pipeline", "expert", "expert_data")


@dataclass(frozen=True)
class Coords:
    stage: int
    data: int
    context: int
    expert: int  # index inside the rank's expert-parallel group


@dataclass(frozen=True)
class Mesh:
    world: int
    context: int = 1
    pipeline: int = 1
    expert: int = 1

    def __post_init__(self):
        if min(self.world, self.context, self.pipeline, self.expert) < 1:
            raise ValueError(f"mesh sizes must be positive: {self}")
        if self.world % (self.context * self.pipeline):
            raise ValueError(f"context ({self.context}) x pipeline ({self.pipeline}) does not divide world ({self.world})")
        if self.stage_size % self.expert:
            raise ValueError(f"expert parallel size ({self.expert}) does not divide the {self.stage_size} ranks of a stage")

    @classmethod
    def from_config(cls, parallel: Any) -> "Mesh":
        """From a `ParallelConfig` (validated there with messages naming the recipe keys)."""
        return cls(parallel.world_size, parallel.context_parallel_size, parallel.pipeline_parallel_size,
                   parallel.expert_parallel_size)

    @property
    def data(self) -> int:
        return self.world // (self.context * self.pipeline)

    @property
    def stage_size(self) -> int:
        """Ranks in one pipeline stage: DP x CP."""
        return self.world // self.pipeline

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside the world of {self.world}")
        within = rank % self.stage_size
        return Coords(rank // self.stage_size, within // self.context, within % self.context, within % self.expert)

    def rank(self, stage: int, data: int, context: int) -> int:
        return stage * self.stage_size + data * self.context + context

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of one kind, each a sorted list of ranks; together they partition the world."""
        stages = [range(s * self.stage_size, (s + 1) * self.stage_size) for s in range(self.pipeline)]
        if kind == "context":
            return [[self.rank(s, d, c) for c in range(self.context)]
                    for s in range(self.pipeline) for d in range(self.data)]
        if kind == "data":
            return [[self.rank(s, d, c) for d in range(self.data)]
                    for s in range(self.pipeline) for c in range(self.context)]
        if kind == "replica":
            return [list(ranks) for ranks in stages]
        if kind == "pipeline":
            return [[self.rank(s, d, c) for s in range(self.pipeline)]
                    for d in range(self.data) for c in range(self.context)]
        if kind == "expert":
            return [list(ranks[i:i + self.expert]) for ranks in stages for i in range(0, len(ranks), self.expert)]
        if kind == "expert_data":
            return [list(ranks[i::self.expert]) for ranks in stages for i in range(self.expert)]
        raise ValueError(f"unknown group kind {kind!r}; one of {', '.join(KINDS)}")

    def group_of(self, kind: str, rank: int) -> list[int]:
        return next(g for g in self.groups(kind) if rank in g)


def build_groups(mesh: Mesh, rank: int) -> dict[str, Any]:
    """This rank's process group of every kind (collective: every rank creates every group, in KINDS order)."""
    import torch.distributed as dist

    mine = {}
    for kind in KINDS:
        for ranks in mesh.groups(kind):
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    return mine
