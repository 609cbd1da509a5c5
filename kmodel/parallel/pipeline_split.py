"""Which decoder layers each pipeline stage holds, and the arithmetic of the pipeline schedules.

The model is cut into `stages x virtual_stages` chunks of consecutive decoder layers; chunk c runs on stage
c % stages (the interleaved schedule's placement; one chunk per stage under 1F1B). Chunk 0 also holds the
embedding, the last chunk the final norm, the LM head and the MTP depths (kmodel.plan.model_pieces).

The split minimises the slowest chunk's training FLOPs per token (kmodel.train.flops: dense and MoE layers, sliding
and global attention, the head and MTP on the last chunk), subject to a memory limit per stage when one is given
(kmodel.plan's memory model: each chunk's weights, gradients and optimizer state, and its activations times the
micro-batches the schedule keeps in flight on its stage). Among the splits that reach the least time it takes the
one whose largest chunk memory is least. `parallel.pipeline_layers` overrides it. Deterministic: the same recipe
gives the same split on every rank and in the planner.

Schedules (`parallel.pipeline_schedule`), with p stages, v chunks per stage and m micro-batches
(`train.grad_accum_steps`):
    1f1b              bubble (p - 1) / m;       stage i keeps min(p - i, m) micro-batches in flight; m >= p
    interleaved_1f1b  bubble (p - 1) / (v m);   stage i keeps min(2 (p - i - 1) + (v - 1) p + 1, v m) chunk
                      micro-batches in flight (each ~1/v of the stage's activations); m a multiple of p
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kmodel.config import Config
from kmodel.plan import Assumptions, Piece, model_pieces, pieces_memory, uses_fused_loss

SCHEDULES = ("1f1b", "interleaved_1f1b")


class PipelineSplitError(ValueError):
    """A pipeline layout that cannot run; the message names the numbers and a fix."""


# --- schedules -----------------------------------------------------------------------------------------


def bubble_fraction(stages: int, virtual_stages: int, micro_batches: int) -> float:
    """Idle share of a pipeline step relative to its busy time: (p - 1) / (v m)."""
    return (stages - 1) / (virtual_stages * micro_batches)


def micro_batches_in_flight(stages: int, virtual_stages: int, stage: int, micro_batches: int) -> float:
    """Micro-batches of activations stage `stage` holds at its peak, in units of its whole activations per
    micro-batch: 1F1B starts p - i forwards before its first backward; the interleaved schedule (Megatron's count)
    2 (p - i - 1) + (v - 1) p + 1 chunk forwards, each of one chunk (~1/v of the stage)."""
    if virtual_stages == 1:
        return min(stages - stage, micro_batches)
    chunk_forwards = 2 * (stages - stage - 1) + (virtual_stages - 1) * stages + 1
    return min(chunk_forwards, virtual_stages * micro_batches) / virtual_stages


def check_pipeline(cfg: Config) -> list[range]:
    """Validate the recipe's pipeline (stages against layers, schedule against virtual stages and micro-batches,
    `parallel.pipeline_layers`) and return its split."""
    p = cfg.parallel
    stages, virtual, schedule = p.pipeline_parallel_size, p.pipeline_virtual_stages, p.pipeline_schedule
    micro_batches = cfg.train.grad_accum_steps
    if virtual > 1 and schedule != "interleaved_1f1b":
        raise PipelineSplitError(
            f"parallel.pipeline_virtual_stages ({virtual}) needs parallel.pipeline_schedule: interleaved_1f1b "
            f"({schedule} runs one chunk per stage); set pipeline_schedule=interleaved_1f1b or pipeline_virtual_stages=1"
        )
    if schedule == "interleaved_1f1b" and virtual == 1:
        raise PipelineSplitError(
            "parallel.pipeline_schedule interleaved_1f1b with pipeline_virtual_stages 1 is plain 1F1B; set "
            "pipeline_virtual_stages >= 2 or pipeline_schedule=1f1b"
        )
    if virtual > 1 and stages == 1:
        raise PipelineSplitError(
            f"parallel.pipeline_virtual_stages ({virtual}) needs pipeline_parallel_size > 1 (one stage has no "
            "pipeline to interleave); set pipeline_virtual_stages=1"
        )
    if stages > 1 and schedule == "1f1b" and micro_batches < stages:
        raise PipelineSplitError(
            f"train.grad_accum_steps ({micro_batches} micro-batches) is fewer than parallel.pipeline_parallel_size "
            f"({stages}): 1F1B needs at least one micro-batch per stage; set train.grad_accum_steps >= {stages} "
            f"(bubble (p - 1) / m = {bubble_fraction(stages, 1, stages):.2f} at {stages})"
        )
    if stages > 1 and schedule == "interleaved_1f1b" and micro_batches % stages:
        fix = max(stages, micro_batches // stages * stages)
        raise PipelineSplitError(
            f"train.grad_accum_steps ({micro_batches} micro-batches) is not a multiple of "
            f"parallel.pipeline_parallel_size ({stages}), which the interleaved schedule needs; set "
            f"train.grad_accum_steps={fix}"
        )
    return split_layers(cfg, stages, virtual)


# --- the split -------------------------------------------------------------------------------------------


def split_layers(cfg: Config, stages: int, virtual_stages: int = 1, memory_limit: float | None = None) -> list[range]:
    """For each of the `stages x virtual_stages` chunks in order, the decoder-layer indices it holds.

    `parallel.pipeline_layers` (layers per chunk) is used when set; otherwise the cost model's split, each stage's
    memory at most `memory_limit` bytes where a split allows it (without a limit, or when none fits, the least
    memory among the fastest splits)."""
    n, chunks = cfg.model.num_hidden_layers, stages * virtual_stages
    if stages < 1 or virtual_stages < 1:
        raise PipelineSplitError(f"pipeline stages ({stages}) and virtual stages ({virtual_stages}) must be positive")
    if chunks > n:
        what = f"{stages} stages x {virtual_stages} virtual stages = {chunks} chunks" if virtual_stages > 1 else (
            f"parallel.pipeline_parallel_size ({stages})")
        raise PipelineSplitError(
            f"{what} exceed model.num_hidden_layers ({n}): every chunk needs at least one layer; use at most "
            f"{n // virtual_stages} stages"
        )
    world, ep = cfg.parallel.world_size, cfg.parallel.expert_parallel_size
    if world % stages or (world // stages) % ep:
        raise PipelineSplitError(
            f"{stages} pipeline stages of parallel.world_size ({world}) ranks do not each hold whole expert-parallel "
            f"groups of {ep}: use a stage count that divides world_size / expert_parallel_size ({world // ep})"
        )
    given = cfg.parallel.pipeline_layers
    if given is not None:
        return _ranges(_checked_counts(given, chunks, n))
    if chunks == 1:
        return [range(n)]
    return _ranges(_Costs(cfg, stages, virtual_stages).best_counts(memory_limit))


def chunk_pieces(cfg: Config, split: list[range]) -> list[list[Piece]]:
    """The pieces (kmodel.plan.model_pieces) each chunk of `split` holds: its layers, the embedding on the first
    chunk, MTP and head on the last."""
    pieces = model_pieces(cfg)
    n = cfg.model.num_hidden_layers
    first, layers, last = pieces[:1], pieces[1 : 1 + n], pieces[1 + n :]
    held = [[layers[i] for i in r] for r in split]
    held[0] = first + held[0]
    held[-1] = held[-1] + last
    return held


def _checked_counts(counts: list[int], chunks: int, layers: int) -> list[int]:
    if len(counts) != chunks:
        raise PipelineSplitError(
            f"parallel.pipeline_layers has {len(counts)} entries for {chunks} chunks (pipeline_parallel_size x "
            f"pipeline_virtual_stages); give one layer count per chunk"
        )
    empty = [i for i, c in enumerate(counts) if c < 1]
    if empty:
        raise PipelineSplitError(
            f"parallel.pipeline_layers[{empty[0]}] is {counts[empty[0]]}: every chunk needs at least one layer"
        )
    if sum(counts) != layers:
        raise PipelineSplitError(
            f"parallel.pipeline_layers {counts} sum to {sum(counts)}, not model.num_hidden_layers ({layers}); "
            f"adjust the counts by {layers - sum(counts):+d}"
        )
    return list(counts)


def _ranges(counts: list[int]) -> list[range]:
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


@dataclass(frozen=True)
class _Cost:
    """What a group of pieces costs a chunk: FLOPs per token, fixed bytes (weights, gradients, optimizer state),
    activation bytes per micro-batch in flight, and its recompute peak (once per chunk)."""

    flops: float = 0.0
    fixed: float = 0.0
    per_micro_batch: float = 0.0
    once: float = 0.0


_FASTEST: dict[tuple, float] = {}  # see _Costs.fastest


class _Costs:
    """Per-layer time and memory of one recipe's chunks, as prefix sums, for the bottleneck search."""

    def __init__(self, cfg: Config, stages: int, virtual: int):
        self.n, self.chunks, self.stages, self.virtual = cfg.model.num_hidden_layers, stages * virtual, stages, virtual
        pieces = model_pieces(cfg)
        cost = _piece_cost(cfg, stages)
        layer_costs = [cost([x]) for x in pieces[1 : 1 + self.n]]
        first, last = cost(pieces[:1]), cost(pieces[1 + self.n :])
        self.extras = [first] + [_Cost()] * (self.chunks - 2) + [last]
        self.flops = _prefix([c.flops for c in layer_costs])
        self.fixed = _prefix([c.fixed for c in layer_costs])
        self.per_micro_batch = _prefix([c.per_micro_batch for c in layer_costs])
        self.once = [c.once for c in layer_costs]
        micro_batches = cfg.train.grad_accum_steps
        self.in_flight = [micro_batches_in_flight(stages, virtual, c % stages, micro_batches) for c in range(self.chunks)]

    def time(self, chunk: int, i: int, j: int) -> float:
        return self.flops[j] - self.flops[i] + self.extras[chunk].flops

    def memory(self, chunk: int, i: int, j: int, once: float) -> float:
        """Bytes of chunk `chunk` holding layers i..j-1, whose largest recompute peak is `once`."""
        extra = self.extras[chunk]
        per_micro_batch = self.per_micro_batch[j] - self.per_micro_batch[i] + extra.per_micro_batch
        return self.fixed[j] - self.fixed[i] + extra.fixed + self.in_flight[chunk] * per_micro_batch + max(once, extra.once)

    def greedy(self, max_time: float, max_memory: float) -> list[int] | None:
        """Layers per chunk when each chunk in turn takes as many layers as fit under both bounds (leaving one for
        every later chunk), or None when the last chunk then exceeds them. Optimal for feasibility: any split
        within the bounds ends each chunk no later than this one does. (The search's inner loop: kept flat.)"""
        flops, fixed, per_micro_batch, layer_once, n = self.flops, self.fixed, self.per_micro_batch, self.once, self.n
        counts, start = [], 0
        for chunk in range(self.chunks):
            extra, in_flight, last = self.extras[chunk], self.in_flight[chunk], chunk == self.chunks - 1
            time_left = max_time - extra.flops + flops[start]
            memory_left = max_memory - extra.fixed + fixed[start] - in_flight * (extra.per_micro_batch - per_micro_batch[start])
            end, once, fits = start, extra.once, False
            for candidate in range(start + 1, (n if last else n - (self.chunks - chunk - 1)) + 1):
                peak = max(once, layer_once[candidate - 1])
                fits = flops[candidate] <= time_left and fixed[candidate] + in_flight * per_micro_batch[candidate] + peak <= memory_left
                if not (fits or last):
                    break
                end, once = candidate, peak
            if end == start or (last and not fits):
                return None
            counts.append(end - start)
            start = end
        return counts

    def best_counts(self, memory_limit: float | None) -> list[int]:
        # per chunk: 1/v of a stage's limit (the stage's v chunks together then fit)
        limit = float("inf") if memory_limit is None else memory_limit / self.virtual
        if self.greedy(float("inf"), limit) is None:  # nothing fits the limit: the fastest split, least memory first
            limit = float("inf")
        best_time = self.fastest(limit)
        least_memory = _least(lambda m: self.greedy(best_time, m) is not None, self.largest(self.greedy(best_time, limit))[1])
        return self.greedy(best_time, least_memory)

    def fastest(self, limit: float) -> float:
        """The least time of the slowest chunk; without a memory limit it depends on the FLOPs alone, so it is
        kept for the other layouts a planner search tries."""
        key = (tuple(self.flops), tuple(e.flops for e in self.extras)) if limit == float("inf") else None
        if key in _FASTEST:
            return _FASTEST[key]
        best = self.largest(self.greedy(_least(lambda t: self.greedy(t, limit) is not None, self.longest()), limit))[0]
        if key is not None:
            if len(_FASTEST) > 4096:
                _FASTEST.clear()
            _FASTEST[key] = best
        return best

    def longest(self) -> float:
        """An upper bound of any chunk's time: all layers and both ends."""
        return self.flops[-1] + sum(e.flops for e in self.extras)

    def largest(self, counts: list[int]) -> tuple[float, float]:
        """The slowest chunk's time and the largest chunk's memory of a split."""
        time = memory = 0.0
        start = 0
        for chunk, count in enumerate(counts):
            end = start + count
            time = max(time, self.time(chunk, start, end))
            memory = max(memory, self.memory(chunk, start, end, max(self.once[start:end])))
            start = end
        return time, memory


def _least(ok: Callable[[float], bool], high: float) -> float:
    """A bound within 1e-9 (relative) above the least one for which `ok` holds, `ok` being monotone and
    holding at `high`: bisection, so the answer is the same on every machine."""
    low = 0.0
    while high - low > 1e-9 * high:
        middle = (low + high) / 2
        if ok(middle):
            high = middle
        else:
            low = middle
    return high


def _prefix(values: list[float]) -> list[float]:
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return sums


def _piece_cost(cfg: Config, stages: int) -> Callable[[list[Piece]], _Cost]:
    """The cost of a group of pieces, split by kmodel.plan's memory model into fixed bytes, bytes per micro-batch
    in flight and the once-per-stage recompute peak (activation checkpointing)."""
    assume, fused = Assumptions.for_config(cfg), uses_fused_loss(cfg)
    replicas = cfg.parallel.world_size // stages

    def cost(group: list[Piece]) -> _Cost:
        idle = pieces_memory(cfg, replicas, assume, group, fused_loss=fused, in_flight=0)
        busy = pieces_memory(cfg, replicas, assume, group, fused_loss=fused, in_flight=1)
        return _Cost(sum(x.flops_per_token for x in group), idle.total - idle.activations,
                       busy.activations - idle.activations, idle.activations)

    return cost


def stage_pieces(cfg: Config, split: list[range], stages: int) -> list[list[Piece]]:
    """The pieces each stage holds: its chunks c, c + p, ... (MTP reads the input embeddings, which travel with
    the hidden states from the first stage: kmodel.parallel.pipeline)."""
    held = chunk_pieces(cfg, split)
    return [[x for c in range(s, len(held), stages) for x in held[c]] for s in range(stages)]
