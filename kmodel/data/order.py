"""The global order of training rows, computed from token counts alone.

A row is a window of seq_len + 1 consecutive tokens of one source's token stream (its shards joined, every
document ending in EOS): inputs are its first seq_len tokens, labels its last seq_len. Row r of the run is
found without reading any token and without any table that grows with the corpus:

  source   rows come in blocks of BLOCK_ROWS; every block gives each source the same quota (its weight's
           share of the block, largest remainder), laid out in a seeded shuffled order per block. Row r's
           source and its index j among that source's rows follow from r alone.
  window   source s has W = (tokens - 1) // seq_len windows per epoch; its j-th row lies in epoch j // W,
           at window position perm_epoch(j % W) of a seeded permutation evaluated point by point (a Feistel
           network with cycle walking). Each epoch also shifts the window grid by a seeded offset below
           seq_len (the stream wraps around), so epochs cut the text differently.

Everything is seeded by (seed, stage, purpose, source, epoch or block), so the rows are a pure function of the
seed, the stage, the weights, seq_len and the sources' token counts. The number of rows drawn is the whole
iterator state: resuming from it continues the exact sequence, on any number of ranks, and a rank reads only
the rows it trains on. A stage (a run continued from another run's checkpoint, with new weights or seq_len)
is a new order seeded by its stage index; the stages before it are carried in the state and the ledger.
"""

from __future__ import annotations

import hashlib
import sys
import numpy as np

from kmodel.data.packing import Batch, rows_to_batch
from kmodel.data.shards import TokenStream
from kmodel.data.sources import DataError

ORDER_FORMAT = "kmodel-order/1"  # bump when the order a position counts in changes
BLOCK_ROWS = 4096
FEISTEL_ROUNDS = 4
_MASK64 = (1 << 64) - 1
# Purposes mixed into the seeds, so the block layouts, window permutations and grid shifts are independent.
_BLOCK_LAYOUT, _WINDOW_ORDER, _GRID_SHIFT = 1, 2, 3


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, stage, purpose, ...), independent for every distinct tuple."""
    digest = hashlib.sha256(b"kmodel-order:" + ",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (multiplication wraps modulo 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded bijection of range(n), evaluated for any indices without a table: a balanced Feistel
    network on the smallest even number of bits covering n, cycle-walked back into range (< 4 rounds of
    walking on average, since 2**bits < 4n)."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.round_keys = [np.uint64(derive_key(key, r) & _MASK64) for r in range(FEISTEL_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for key in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << shift) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        x = self._encrypt(np.asarray(indices, dtype=np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():
            x[outside] = self._encrypt(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


def block_quotas(weights: list[float], labels: list[str]) -> np.ndarray:
    """Rows per source in every block: the weights' shares of BLOCK_ROWS, largest remainder first."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights) * BLOCK_ROWS
    quotas = np.floor(share).astype(np.int64)
    remainder = share - quotas
    for index in np.argsort(-remainder, kind="stable")[: BLOCK_ROWS - int(quotas.sum())]:
        quotas[index] += 1
    starved = [labels[i] for i in np.flatnonzero(quotas == 0)]
    if starved:
        raise DataError(f"data source {starved[0]!r}: its weight is below one row in {BLOCK_ROWS}; raise it or drop the source")
    return quotas


def block_layout(seed: int, stage: int, quotas: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Source of every row of a block, and each row's index among its source's rows in the block."""
    layout = np.repeat(np.arange(len(quotas)), quotas)
    layout = layout[np.random.default_rng([seed, stage, _BLOCK_LAYOUT, block]).permutation(BLOCK_ROWS)]
    within = np.empty(BLOCK_ROWS, dtype=np.int64)
    for source in range(len(quotas)):
        where = layout == source
        within[where] = np.arange(int(where.sum()))
    return layout, within


def rows_per_source(seed: int, stage: int, quotas: np.ndarray, rows: int) -> list[int]:
    """Rows each source gives in the first `rows` rows of a stage's order."""
    full, rest = divmod(rows, BLOCK_ROWS)
    counts = full * quotas
    if rest:
        counts = counts + np.bincount(block_layout(seed, stage, quotas, full)[0][:rest], minlength=len(quotas))
    return [int(c) for c in counts]


class Mixture:
    """Rows drawn from weighted token streams in the seed-determined order above; `rows_drawn` is the state."""

    def __init__(self, streams: list[TokenStream], weights: list[float], seed: int, seq_len: int, eos_id: int,
                 document_masking: bool, stage: int = 0):
        self.streams, self.seed, self.seq_len, self.stage = streams, seed, seq_len, stage
        self.eos_id, self.document_masking = eos_id, document_masking
        self.labels, self.weights = [s.label for s in streams], list(weights)
        self.previous_stages: list[dict] = []
        self.windows = np.array([(s.num_tokens - 1) // seq_len for s in streams], dtype=np.int64)
        for label, stream, windows in zip(self.labels, streams, self.windows):
            if windows < 1:
                raise DataError(f"data source {label!r} has {stream.num_tokens} tokens, fewer than one row of "
                                f"data.seq_len + 1 = {seq_len + 1}")
        self.quotas = block_quotas(weights, self.labels)
        self.rows_drawn = 0
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._epochs: dict[tuple[int, int], tuple[Permutation, int]] = {}

    # --- the order ---------------------------------------------------------------------------------------
    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        if block not in self._blocks:
            if len(self._blocks) >= 4:
                self._blocks.clear()
            self._blocks[block] = block_layout(self.seed, self.stage, self.quotas, block)
        return self._blocks[block]

    def _epoch(self, source: int, epoch: int) -> tuple[Permutation, int]:
        """Source's window permutation and grid shift in an epoch."""
        if (source, epoch) not in self._epochs:
            key = derive_key(self.seed, self.stage, _WINDOW_ORDER, source, epoch)
            shift = derive_key(self.seed, self.stage, _GRID_SHIFT, source, epoch) % self.seq_len
            if len(self._epochs) >= 64:
                self._epochs.clear()
            self._epochs[source, epoch] = Permutation(int(self.windows[source]), key), shift
        return self._epochs[source, epoch]

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, first token in the source's stream) of each global row index."""
        rows = np.asarray(rows, dtype=np.int64)
        sources, nth = np.empty_like(rows), np.empty_like(rows)
        blocks, offsets = np.divmod(rows, BLOCK_ROWS)
        for block in np.unique(blocks):
            layout, within = self._block(int(block))
            here = blocks == block
            sources[here] = layout[offsets[here]]
            nth[here] = block * self.quotas[sources[here]] + within[offsets[here]]
        epochs, positions = np.divmod(nth, self.windows[sources])
        starts = np.empty_like(rows)
        for source, epoch in {(int(s), int(e)) for s, e in zip(sources, epochs)}:
            here = (sources == source) & (epochs == epoch)
            permutation, shift = self._epoch(source, epoch)
            starts[here] = shift + permutation(positions[here]) * self.seq_len
        return sources, starts

    def windows_at(self, rows: np.ndarray) -> np.ndarray:
        """The (len(rows), seq_len + 1) token windows of these global rows, read through the memory maps."""
        sources, starts = self.locate(rows)
        out = np.empty((len(sources), self.seq_len + 1), dtype=np.int64)
        for i, (source, start) in enumerate(zip(sources, starts)):
            out[i] = self.streams[int(source)].read(int(start), self.seq_len + 1)
        return out

    # --- iteration -------------------------------------------------------------------------------------------
    def next_batch(self, rows: int, keep: slice | None = None) -> Batch:
        """The next `rows` rows of the order; with `keep`, only those rows of them are read (a rank's share)."""
        indices = np.arange(self.rows_drawn, self.rows_drawn + rows)
        self.rows_drawn += rows
        if keep is not None:
            indices = indices[keep]
        return rows_to_batch(self.windows_at(indices), self.eos_id, self.document_masking)

    def rows_per_source(self, rows: int | None = None) -> list[int]:
        """Rows each source has given in the first `rows` rows (default: those drawn so far)."""
        return rows_per_source(self.seed, self.stage, self.quotas, self.rows_drawn if rows is None else rows)

    # --- state and stages -------------------------------------------------------------------------------------
    def order_record(self) -> dict:
        """What determines the order (for the ledger): seed, stage, seq_len, weights, and the stages before."""
        return {"seed": self.seed, "stage": self.stage, "seq_len": self.seq_len,
                "weights": dict(zip(self.labels, self.weights)), "previous_stages": self.previous_stages}

    def stage_summary(self) -> dict:
        """This stage as it ends here: its order and the rows and tokens each source gave."""
        rows = self.rows_per_source()
        return {"stage": self.stage, "seq_len": self.seq_len, "weights": dict(zip(self.labels, self.weights)),
                "rows": self.rows_drawn, "tokens": {label: n * self.seq_len for label, n in zip(self.labels, rows)}}

    def state_dict(self) -> dict:
        return {"order": ORDER_FORMAT, "rows_drawn": self.rows_drawn, "stage": self.stage,
                "previous_stages": self.previous_stages, "summary": self.stage_summary()}

    def load_state_dict(self, state: dict) -> None:
        """Continue at a checkpoint's position, in the checkpoint's stage."""
        if state.get("order") != ORDER_FORMAT:
            counted_in = state.get("order") or f"an order before {ORDER_FORMAT}"
            print(f"warning: the checkpoint's data position counts rows of another order ({counted_in}); the run "
                  f"continues at row {state['rows_drawn']} of {ORDER_FORMAT}, so the rows after the resume differ from "
                  "the original plan", file=sys.stderr)
        self.rows_drawn = int(state["rows_drawn"])
        self._enter_stage(int(state.get("stage", 0)), list(state.get("previous_stages", [])))

    def start_stage(self, previous: dict) -> None:
        """Begin the stage after the one a checkpoint of another run was in (`previous`: its data state): a new
        order seeded by the next stage index, from row 0, with the stages so far recorded."""
        summary = previous.get("summary") or {"stage": int(previous.get("stage", 0)), "rows": int(previous["rows_drawn"])}
        self.rows_drawn = 0
        self._enter_stage(int(previous.get("stage", 0)) + 1, list(previous.get("previous_stages", [])) + [summary])

    def _enter_stage(self, stage: int, previous_stages: list[dict]) -> None:
        if stage != self.stage:
            self._blocks.clear()
            self._epochs.clear()
        self.stage, self.previous_stages = stage, previous_stages
