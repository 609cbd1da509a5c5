"""Context parallelism: one sequence split over a group of ranks, with attention that knows sliding windows.

Layout (causal zigzag). A sequence of S tokens is cut into 2·C chunks of L = S / (2·C) tokens for a group of C
ranks; rank r holds chunks r and 2C−1−r, so every rank holds one early and one late chunk and does the same
causal attention work. Rank r's local tokens are those two chunks, in that order.

What each attention layer exchanges:
- A sliding-window layer (window W) only needs, for each chunk, the W−1 keys and values just before it: the tail
  of the previous chunk. Each rank sends the tails of its chunks to the owners of the following chunks (point to
  point) and receives the tails it needs: (W−1) rows per chunk whose predecessor lives on another rank, instead of
  the whole sequence. When W−1 exceeds a chunk the halo would span several chunks; that layer then gathers like a
  global one (exact, counted as a gather).
- A global layer gathers every rank's keys and values (all-gather; backward sums the gradients back, a
  reduce-scatter). MLA exchanges its compressed latent and shared RoPE key instead of per-head keys and values
  (`exchanged_attention` with the module's expansion applied on arrival), which is what makes it cheap there.
Attention itself runs on the local queries against the keys they can see, with a mask built from global
positions, so packed documents (`doc_ids` of the whole sequence), RoPE (the caller rotates with
`ContextLayout.positions()`), NoPE and attention sinks are exact.

Every exchange adds its bytes to `CommStats` by layer kind, so tests compare them with `halo_bytes` /
`gather_bytes`, the formulas the planner uses.

In training (`ContextParallel`, one per engine): every CP rank of a data-parallel rank reads the same rows and keeps
its chunks of them (`layout.shard`: input ids and the already shifted labels, so each chunk keeps its own targets),
rotates with the chunks' global positions, and each attention module's kernel seam is replaced from outside the
model by `ContextParallelAttention`, which exchanges keys and values while a batch is open and hands everything else
(cached decoding) to the module's own kernel; held-out evaluation runs split too (`SplitEvaluation`). Document ids
come from the whole rows, so packed documents crossing chunk boundaries stay exact. The loss a CP rank backpropagates is CP x its share of the
one-process micro-batch loss: token means (cross-entropy, logits z-loss) re-weighted by the rank's share of the
rows' label tokens, and the MoE balance loss computed from expert counts summed over the group (its probability
means are over local tokens, so their CP-rank mean is the whole sequence's). Averaged over the replica group (DP x
CP ranks: DeepSpeed's and the expert optimizer's reduction), the gradient is the one-process gradient.

Multi-token prediction: the model gets the whole rows (`Rows`) beside the chunks and reads the tokens and labels
ahead of its positions there; the last k positions of a row, which one process drops at depth k, stay in their
chunk with ignored targets and out of the MoE statistics (kmodel.model.decoder.Model.mtp_losses), and each depth's
cross-entropy is re-weighted by the rank's share of that depth's targets.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kmodel.config import Config, ConfigError
from kmodel.data import IGNORE_INDEX, Batch
from kmodel.kernels.attention.reference import masked_attention, visibility_mask
from kmodel.model.decoder import ATTENTION_KINDS, ModelOutput, Rows, mtp_targets
from kmodel.train.trainer import LOSS_KEYS


@dataclass(frozen=True)
class ContextLayout:
    """Where rank `rank` of a context-parallel group of `size` ranks sits in a sequence of `seq_len` tokens."""

    seq_len: int
    size: int
    rank: int

    def __post_init__(self) -> None:
        if self.size <= 0 or not 0 <= self.rank < self.size:
            raise ValueError(f"context-parallel rank {self.rank} is not in a group of {self.size}")
        if self.seq_len % (2 * self.size):
            raise ValueError(
                f"sequence length {self.seq_len} is not divisible by 2 x context_parallel_size = {2 * self.size} "
                f"(the zigzag layout cuts it into that many equal chunks); use a sequence length that is a multiple "
                f"of {2 * self.size}"
            )

    @property
    def chunk_len(self) -> int:
        return self.seq_len // (2 * self.size)

    def chunks(self, rank: int | None = None) -> tuple[int, int]:
        rank = self.rank if rank is None else rank
        return rank, 2 * self.size - 1 - rank

    def owner(self, chunk: int) -> int:
        return chunk if chunk < self.size else 2 * self.size - 1 - chunk

    def positions(self, rank: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions of a rank's local tokens, in local order."""
        first, second = self.chunks(rank)
        length = self.chunk_len
        return torch.cat([torch.arange(c * length, (c + 1) * length, device=device) for c in (first, second)])

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor (`dim` is the sequence dimension)."""
        return x.index_select(dim, self.positions(device=x.device))

    def unshard(self, pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The whole sequence from every rank's local tensor (rank order)."""
        order = torch.cat([self.positions(r) for r in range(self.size)])
        full = torch.cat(pieces, dim=dim)
        return full.index_select(dim, torch.argsort(order).to(full.device))


@dataclass
class CommStats:
    """Bytes this rank received, by layer kind ("sliding", "global")."""

    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        self.received[kind] += tensor.numel() * tensor.element_size()


def halo_bytes(layout: ContextLayout, window: int, row_bytes: int) -> int:
    """Bytes rank `layout.rank` receives in one sliding-window layer's forward: W−1 rows for each of its chunks
    whose predecessor chunk lives on another rank. `row_bytes`: one token position of the exchanged keys and values
    (batch x kv heads x (k dim + v dim) x element size; MLA: batch x latent width x element size)."""
    if window - 1 > layout.chunk_len:
        return gather_bytes(layout, row_bytes)
    remote = sum(1 for c in layout.chunks() if c > 0 and layout.owner(c - 1) != layout.rank)
    return remote * (window - 1) * row_bytes


def gather_bytes(layout: ContextLayout, row_bytes: int) -> int:
    """Bytes one rank receives in one global layer's all-gather: every other rank's local tokens."""
    return (layout.size - 1) * 2 * layout.chunk_len * row_bytes


class _HaloExchange(torch.autograd.Function):
    """Send the tail rows `sends[i] = (peer, start)` of x to their peers and receive `rows` rows from each peer in
    `recv_from`. Backward sends the received rows' gradients back and adds what returns to x's gradient, so every
    rank joins the backward exchange exactly as it joined the forward one."""

    @staticmethod
    def forward(ctx, x, group, sends, recv_from, rows):
        ctx.group, ctx.sends, ctx.recv_from, ctx.rows, ctx.shape = group, sends, recv_from, rows, x.shape
        shape = (x.shape[0], rows, *x.shape[2:])
        incoming = [x.new_empty(shape) for _ in recv_from]
        _exchange(group, [(peer, x.narrow(1, start, rows)) for peer, start in sends], list(zip(recv_from, incoming)))
        return tuple(incoming)

    @staticmethod
    def backward(ctx, *grads):
        shape = (ctx.shape[0], ctx.rows, *ctx.shape[2:])
        grads = [torch.zeros(shape, dtype=g.dtype, device=g.device) if g is None else g.contiguous() for g in grads]
        back = [grads[0].new_empty(shape) for _ in ctx.sends]
        _exchange(ctx.group, list(zip(ctx.recv_from, grads)), [(peer, b) for (peer, _), b in zip(ctx.sends, back)])
        grad_x = grads[0].new_zeros(ctx.shape)
        for (_, start), b in zip(ctx.sends, back):
            grad_x.narrow(1, start, ctx.rows).add_(b)
        return grad_x, None, None, None, None


def _exchange(group, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> None:
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, peer), group) for peer, t in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for peer, t in recvs]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence dimension (dim 1); backward sums the gradients over the group and keeps this
    rank's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, group, x):
        ctx.group, ctx.length = group, x.shape[1]
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        rank = dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == "nccl":
            pieces = list(grad.split(ctx.length, dim=1))
            out = torch.empty_like(pieces[rank])
            dist.reduce_scatter(out, [p.contiguous() for p in pieces], group=ctx.group)
            return None, out
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return None, grad.narrow(1, rank * ctx.length, ctx.length).contiguous()


def gather_sequence(x: torch.Tensor, layout: ContextLayout, group, stats: CommStats | None = None,
                    kind: str = "global") -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's local rows of `x` (batch, local, ...) and their global positions, differentiably."""
    full = _GatherSequence.apply(group, x)
    if stats is not None:
        stats.received[kind] += (full.numel() - x.numel()) * x.element_size()
    positions = torch.cat([layout.positions(r, x.device) for r in range(layout.size)])
    return full, positions


def halo(x: torch.Tensor, layout: ContextLayout, group, rows: int, stats: CommStats | None = None
         ) -> list[torch.Tensor | None]:
    """For each of this rank's two chunks, the `rows` rows of `x` (batch, local, ...) just before it, or None when
    the chunk starts the sequence. Rows of a predecessor this rank holds itself are sliced locally."""
    length = layout.chunk_len
    local = {chunk: i for i, chunk in enumerate(layout.chunks())}
    tail_start = {chunk: i * length + length - rows for chunk, i in local.items()}
    sends = [(layout.owner(c + 1), tail_start[c]) for c in local
             if c + 1 < 2 * layout.size and layout.owner(c + 1) != layout.rank]
    remote = [c for c in local if c > 0 and c - 1 not in local]
    received = dict(zip(remote, _HaloExchange.apply(x, group, sends, [layout.owner(c - 1) for c in remote], rows)))
    halos: list[torch.Tensor | None] = []
    for c in layout.chunks():
        if c == 0:
            halos.append(None)
        elif c in received:
            halos.append(received[c])
            if stats is not None:
                stats.add("sliding", received[c])
        else:
            halos.append(x.narrow(1, tail_start[c - 1], rows))
    return halos


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: ContextLayout,
    group,
    window: int | None = None,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's local queries (batch, local, q_heads, d) over the whole sequence's keys.

    k, v: this rank's local keys/values (batch, local, kv_heads, d | d_v). window: sliding window or None (global).
    doc_ids: (batch, seq_len) document index of every token of the whole sequence (packed documents), or None.
    Equals `kmodel.kernels.attention.reference.attention` over the whole sequence, restricted to local rows.
    """
    k_dim = k.shape[-1]
    return exchanged_attention(q, torch.cat([k, v], dim=-1), lambda kv: (kv[..., :k_dim], kv[..., k_dim:]),
                               layout=layout, group=group, window=window, scale=scale, doc_ids=doc_ids, sinks=sinks,
                               stats=stats)


def exchanged_attention(
    q: torch.Tensor,
    rows: torch.Tensor,
    unpack: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    *,
    layout: ContextLayout,
    group,
    window: int | None = None,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """`context_parallel_attention` over what each token contributes to keys and values: `rows` (batch, local,
    ...) are exchanged (GQA: keys and values; MLA: the compressed latent and shared RoPE key), and `unpack`
    turns exchanged rows into keys (batch, n, kv_heads, d) and values (batch, n, kv_heads, d_v) on arrival."""
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    length = layout.chunk_len
    pos = layout.positions(device=q.device)
    qt = q.transpose(1, 2)
    if window is not None and window - 1 <= length:
        halos = halo(rows, layout, group, window - 1, stats) if window > 1 else [None, None]
        outs = []
        for i, h in enumerate(halos):
            chunk = slice(i * length, (i + 1) * length)
            seen = rows[:, chunk] if h is None else torch.cat([h, rows[:, chunk]], dim=1)
            key_pos = pos[chunk] if h is None else torch.cat([pos[chunk][:1] - h.shape[1] + torch.arange(
                h.shape[1], device=q.device), pos[chunk]])
            outs.append(_attend(qt[:, :, chunk], *unpack(seen), pos[chunk], key_pos, window, doc_ids, scale, sinks))
        return torch.cat(outs, dim=2).transpose(1, 2)
    kind = "global" if window is None else "sliding"
    everything, key_pos = gather_sequence(rows, layout, group, stats, kind)
    # In sequence order a chunk's visible keys are one slice (causal: up to its last token; window: from W-1
    # before its first), so each chunk attends to that slice only: about half the work of every key for all.
    order = torch.argsort(key_pos)
    keys, values = unpack(everything[:, order])
    key_pos = key_pos[order]
    outs = []
    for i, c in enumerate(layout.chunks()):
        chunk = slice(i * length, (i + 1) * length)
        seen = slice(0 if window is None else max(0, c * length - window + 1), (c + 1) * length)
        outs.append(_attend(qt[:, :, chunk], keys[:, seen], values[:, seen], pos[chunk], key_pos[seen],
                            window, doc_ids, scale, sinks))
    return torch.cat(outs, dim=2).transpose(1, 2)


def _attend(qt, keys, values, q_pos, k_pos, window, doc_ids, scale, sinks) -> torch.Tensor:
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    mask = visibility_mask(q_pos, k_pos, window=window, causal=True).expand(qt.shape[0], 1, -1, -1)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, q_pos, None] == doc_ids[:, None, None, k_pos])
    return masked_attention(qt, keys, values, mask, scale=scale, sinks=sinks)  # GQA: grouped there


# --- training: the engine's side --------------------------------------------------------------------------------


def check_supported(cfg: Config) -> None:
    """Refuse, naming the keys, what context parallelism does not split exactly yet."""
    cp = cfg.parallel.context_parallel_size
    if cp == 1:
        return
    if cfg.train.qk_clip_tau is not None:
        raise ConfigError(
            f"parallel.context_parallel_size {cp} with train.qk_clip_tau: MuonClip's per-head logit maxima are taken "
            "over a rank's whole sequence, which a context-parallel rank does not hold; unset train.qk_clip_tau"
        )
    if cfg.parallel.zero_stage == 0:
        raise ConfigError(
            f"parallel.context_parallel_size {cp} needs parallel.zero_stage 1, 2 or 3: DeepSpeed's stage-0 clipping "
            "takes its gradient norm over a tensor-parallel group, which the replica layout given to DeepSpeed "
            "(kmodel.parallel.deepspeed_config.ReplicaTopology) does not have; set parallel.zero_stage=1 (the same "
            "memory for weights and gradients, optimizer states partitioned)"
        )


def gathered_windows(cfg: Config) -> list[tuple[int, int]]:
    """(layer, window) of the sliding layers whose window reaches past the previous chunk: they gather."""
    chunk = cfg.data.seq_len // (2 * cfg.parallel.context_parallel_size)
    windows = [(i, cfg.model.window_of(i)) for i in range(cfg.model.num_hidden_layers)]
    return [(i, w) for i, w in windows if w is not None and w - 1 > chunk]


def token_share(local_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """This rank's fraction of the label tokens of the whole rows (0 when the rows have none)."""
    total = int((labels != IGNORE_INDEX).sum())
    return int((local_labels != IGNORE_INDEX).sum()) / total if total else 0.0


# Loss terms that are means over label tokens (a rank's share re-weights them); the MoE aux loss is not.
TOKEN_MEANS = ("lm_loss", "z_loss")


def rank_terms(out: Any, scale: float, mtp_scales: list[float] = (), mtp_weights: list[float] = ()
               ) -> dict[str, torch.Tensor]:
    """The loss terms of `out` (a ModelOutput) as this rank contributes them: token means times `scale`
    (CP x the rank's token share), each MTP depth's cross-entropy times its own (`mtp_scales`: CP x the rank's
    share of that depth's targets; `mtp_weights`: the depths' loss weights), the aux loss as it is (the MoE
    statistics are split exactly already), and their total."""
    terms = {k: getattr(out, k) for k in LOSS_KEYS if getattr(out, k) is not None}
    aux = terms.get("aux_loss", 0.0)
    token_means, unscaled = out.loss - aux, aux
    if out.mtp_depth_losses is not None:  # depths too short for the rows are skipped in the model: zip stops
        depths = [s * loss for s, loss in zip(mtp_scales, out.mtp_depth_losses)]
        token_means = token_means - sum(w * loss for w, loss in zip(mtp_weights, out.mtp_depth_losses))
        unscaled = unscaled + sum(w * loss for w, loss in zip(mtp_weights, depths))
        terms["mtp_loss"] = torch.stack(depths).mean()
    terms["loss"] = scale * token_means + unscaled
    for key in TOKEN_MEANS:
        if key in terms:
            terms[key] = scale * terms[key]
    return terms


class ContextParallelAttention:
    """An attention module's kernel seam under context parallelism: while the engine has a batch open,
    `attention` runs on this rank's chunks and exchanges keys and values with the group; otherwise (a forward
    on whole sequences outside training and `SplitEvaluation`) and for every other name (`decode_attention`) it
    is the module's own kernel."""

    def __init__(self, inner: Any, context: ContextParallel):
        self.inner, self.context = inner, context

    def attention(self, q, k, v, **options) -> torch.Tensor:
        if not self.context.open:
            return self.inner.attention(q, k, v, **options)
        return context_parallel_attention(q, k, v, **self._exchange(options))

    def latent_attention(self, q, latent, rope_key, expand, **options) -> torch.Tensor:
        """MLA's seam: exchange each token's normalised latent and shared rotated key (kv_lora_rank + rope dims)
        and expand them to every head's keys and values (`expand`, the module's kv_b_proj) where they arrive."""
        if not self.context.open:
            return self.inner.attention(q, *expand(latent, rope_key), **options)
        width = latent.shape[-1]
        return exchanged_attention(q, torch.cat([latent, rope_key], dim=-1),
                                   lambda rows: expand(rows[..., :width], rows[..., width:]), **self._exchange(options))

    def _exchange(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = set(options) - {"window", "scale", "cu_seqlens", "sinks"}
        if unknown:
            raise ValueError(f"context-parallel attention has no option {sorted(unknown)}")
        # cu_seqlens describes the local rows only; the document ids of the whole rows replace it
        context = self.context
        return {"layout": context.layout, "group": context.group, "window": options.get("window"),
                "scale": options.get("scale"), "doc_ids": context.doc_ids, "sinks": options.get("sinks"),
                "stats": context.stats}

    def __getattr__(self, name: str):
        if name in ("inner", "context"):  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


class SplitEvaluation(torch.nn.Module):
    """Held-out evaluation under context parallelism: `model(input_ids, labels)` on whole rows runs as this rank's
    chunks (no rank holds a whole sequence's activations) and returns the rows' mean cross-entropy as `lm_loss`,
    the same on every rank of the group (collective)."""

    def __init__(self, model: torch.nn.Module, context: ContextParallel):
        super().__init__()
        self.model, self.context = model, context

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        layout = self.context.layout
        local = layout.shard(labels)
        with self.context.opened(None):
            out = self.model(layout.shard(input_ids), local, position_ids=layout.positions(device=local.device),
                             rows=Rows(input_ids, labels))
        nats_and_tokens = torch.stack([out.lm_loss.double() * (local != IGNORE_INDEX).sum(),
                                       (local != IGNORE_INDEX).sum().double()])
        dist.all_reduce(nats_and_tokens, group=self.context.group)
        return ModelOutput(logits=None, lm_loss=nats_and_tokens[0] / nats_and_tokens[1].clamp(min=1))


class ContextParallel:
    """One engine's context parallelism: this rank's layout in its group, the open batch's document ids and the
    bytes its attention layers received in the last forward, by layer kind."""

    def __init__(self, seq_len: int, group):
        self.group = group
        self.layout = ContextLayout(seq_len, dist.get_world_size(group), dist.get_rank(group))
        self.stats = CommStats()
        self.forward_bytes: dict[str, int] = {}
        self.open = False
        self.doc_ids: torch.Tensor | None = None
        self.mtp_weights: list[float] = []

    def attach(self, model: torch.nn.Module) -> None:
        """Put the exchange in every attention module's kernel seam (the MTP blocks' included); keep the MTP
        depths' loss weights."""
        self.mtp_weights = model.cfg.mtp_depth_weights if model.mtp is not None else []
        for module in model.modules():
            if isinstance(module, tuple(ATTENTION_KINDS.values())):
                module.kernel = ContextParallelAttention(module.kernel, self)

    @contextlib.contextmanager
    def opened(self, doc_ids: torch.Tensor | None) -> Iterator[None]:
        self.open, self.doc_ids = True, doc_ids
        try:
            yield
        finally:
            self.open, self.doc_ids = False, None

    def run(self, batch: Batch, forward: Callable[..., Any], backward: Callable[[torch.Tensor], None]
            ) -> dict[str, torch.Tensor]:
        """Forward and backward of this rank's chunks of `batch` (a data-parallel rank's whole rows):
        `forward(input_ids, labels, position_ids=...)` returns a ModelOutput, `backward(loss)` runs inside the open
        batch too (activation checkpointing recomputes attention there). Returns the loss terms, each CP x this
        rank's share of the one-process micro-batch's (`rank_terms`). With MTP the model reads the tokens and
        labels ahead of this rank's positions in the whole rows (`Rows`)."""
        layout = self.layout
        labels = layout.shard(batch.labels)
        scale = layout.size * token_share(labels, batch.labels)
        mtp_scales = []
        for depth in range(1, len(self.mtp_weights) + 1):
            targets = mtp_targets(batch.labels, batch.segment_ids, depth)
            mtp_scales.append(layout.size * token_share(layout.shard(targets), targets))
        self.stats = CommStats()
        with self.opened(batch.segment_ids):
            out = forward(layout.shard(batch.input_ids), labels, position_ids=layout.positions(device=labels.device),
                          rows=Rows(batch.input_ids, batch.labels, batch.segment_ids))
            self.forward_bytes = dict(self.stats.received)
            terms = rank_terms(out, scale, mtp_scales, self.mtp_weights)
            backward(terms["loss"])
        return terms
