"""Packing token streams into fixed-length training rows, and the weighted, resumable mixture of sources.

A row is a window of seq_len + 1 consecutive tokens of a packed stream (documents joined, each ending in
EOS): inputs are its first seq_len tokens, labels its last seq_len, so every position predicts the next
token, across document boundaries too (the EOS position predicts the next document's first token).
With document masking, segment ids number the documents inside a row (an EOS belongs to the document it
ends) and the model keeps attention within a document.

Order: every source reshuffles its documents each epoch and visits its windows in a shuffled order; each
row's source is drawn with probability proportional to the source weights. All draws come from
generators seeded by (seed, purpose, source, epoch or block), so the sequence of rows is a pure function
of the seed and the data, and the number of rows drawn so far is the entire iterator state: resuming
from it continues the exact sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kmodel.data.sources import DataError
from kmodel.data.tokenized import TokenizedDocs

IGNORE_INDEX = -100
# Purposes mixed into the seeds, so the document, window and source draws are independent streams.
_DOCUMENT_ORDER, _WINDOW_ORDER, _SOURCE_CHOICE = 1, 2, 3
# Source choices are drawn this many rows at a time.
CHOICE_BLOCK = 4096


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, seq_len) int64
    labels: torch.Tensor  # (rows, seq_len) int64, IGNORE_INDEX where there is nothing to predict
    segment_ids: torch.Tensor | None = None  # (rows, seq_len) document index per token, for document masking

    def to(self, device: torch.device | str) -> "Batch":
        segments = None if self.segment_ids is None else self.segment_ids.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), segments)

    @property
    def num_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def segment_ids(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Document index of every token in each row; a document's EOS carries its index, the next token starts a new one."""
    is_eos = input_ids == eos_id
    return np.cumsum(is_eos, axis=1) - is_eos


def rows_to_batch(windows: np.ndarray, eos_id: int, document_masking: bool) -> Batch:
    """Windows (rows, seq_len + 1) -> inputs, next-token labels and, with document masking, segment ids."""
    inputs = windows[:, :-1].astype(np.int64)
    labels = windows[:, 1:].astype(np.int64)
    segments = torch.from_numpy(segment_ids(inputs, eos_id)) if document_masking else None
    return Batch(torch.from_numpy(inputs), torch.from_numpy(labels), segments)


def _uniform(seed: int, *stream: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, *stream]).random(size)


def _shuffled(seed: int, *stream: int, size: int) -> np.ndarray:
    """A permutation of range(size) drawn from its own seeded stream."""
    return np.argsort(_uniform(seed, *stream, size=size), kind="stable")


class SourceStream:
    """One source's documents, reshuffled every epoch and cut into windows of seq_len + 1 tokens."""

    def __init__(self, docs: TokenizedDocs, seq_len: int, seed: int, index: int, label: str):
        self.docs, self.seq_len, self.seed, self.index = docs, seq_len, seed, index
        # Windows overlap by one token (the last label of one is the first input of the next).
        self.windows_per_epoch = (len(docs.tokens) - 1) // seq_len
        if self.windows_per_epoch < 1:
            raise DataError(
                f"data source {label!r} has {len(docs.tokens)} tokens, fewer than one row of "
                f"data.seq_len + 1 = {seq_len + 1}"
            )
        self._epoch = -1
        self._stream = self._window_order = None

    def _enter_epoch(self, epoch: int) -> None:
        docs = self.docs
        order = _shuffled(self.seed, _DOCUMENT_ORDER, self.index, epoch, size=len(docs.doc_ends))
        starts, ends = docs.doc_starts, docs.doc_ends
        self._stream = np.concatenate([docs.tokens[starts[d] : ends[d]] for d in order])
        self._window_order = _shuffled(self.seed, _WINDOW_ORDER, self.index, epoch, size=self.windows_per_epoch)
        self._epoch = epoch

    def window(self, j: int) -> np.ndarray:
        """The j-th window this source contributes to training (epochs follow one another)."""
        epoch, k = divmod(j, self.windows_per_epoch)
        if epoch != self._epoch:
            self._enter_epoch(epoch)
        start = int(self._window_order[k]) * self.seq_len
        return self._stream[start : start + self.seq_len + 1]


class Mixture:
    """Rows drawn from weighted sources in a seed-determined order; `rows_drawn` is the whole state."""

    def __init__(self, streams: list[SourceStream], weights: list[float], seed: int, eos_id: int, document_masking: bool):
        self.streams, self.seed = streams, seed
        self.eos_id, self.document_masking = eos_id, document_masking
        self.cumulative = np.cumsum(np.asarray(weights, dtype=np.float64) / sum(weights))
        self.rows_drawn = 0
        self._drawn_per_source = np.zeros(len(streams), dtype=np.int64)
        self._block, self._choices = -1, None

    def _source_choices(self, block: int) -> np.ndarray:
        if block != self._block:
            u = _uniform(self.seed, _SOURCE_CHOICE, block, size=CHOICE_BLOCK)
            self._choices = np.minimum(np.searchsorted(self.cumulative, u, side="right"), len(self.streams) - 1)
            self._block = block
        return self._choices

    def next_windows(self, rows: int) -> np.ndarray:
        out = np.empty((rows, self.streams[0].seq_len + 1), dtype=np.int64)
        for r in range(rows):
            block, offset = divmod(self.rows_drawn, CHOICE_BLOCK)
            source = int(self._source_choices(block)[offset])
            out[r] = self.streams[source].window(int(self._drawn_per_source[source]))
            self._drawn_per_source[source] += 1
            self.rows_drawn += 1
        return out

    def next_batch(self, rows: int) -> Batch:
        return rows_to_batch(self.next_windows(rows), self.eos_id, self.document_masking)

    def rows_per_source(self) -> list[int]:
        return self._drawn_per_source.tolist()

    def state_dict(self) -> dict[str, int]:
        return {"rows_drawn": self.rows_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Move to a position: the per-source counts follow from replaying the source choices."""
        target = int(state["rows_drawn"])
        counts = np.zeros(len(self.streams), dtype=np.int64)
        full_blocks, rest = divmod(target, CHOICE_BLOCK)
        for block in range(full_blocks + (rest > 0)):
            choices = self._source_choices(block)[: CHOICE_BLOCK if block < full_blocks else rest]
            counts += np.bincount(choices, minlength=len(self.streams))
        self.rows_drawn, self._drawn_per_source = target, counts


def sequential_batches(docs: TokenizedDocs, seq_len: int, rows: int, pad_id: int, max_batches: int | None = None) -> Iterator[Batch]:
    """Evaluation batches covering a token stream in order: every token but the first is predicted exactly
    once; the last window is padded (labels IGNORE_INDEX)."""
    tokens = docs.tokens.astype(np.int64)
    starts = range(0, len(tokens) - 1, seq_len)
    for b, first in enumerate(range(0, len(starts), rows)):
        if max_batches is not None and b >= max_batches:
            return
        chunk = starts[first : first + rows]
        inputs = np.full((len(chunk), seq_len), pad_id, dtype=np.int64)
        labels = np.full((len(chunk), seq_len), IGNORE_INDEX, dtype=np.int64)
        for r, s in enumerate(chunk):
            window = tokens[s : s + seq_len + 1]
            inputs[r, : len(window) - 1] = window[:-1]
            labels[r, : len(window) - 1] = window[1:]
        yield Batch(torch.from_numpy(inputs), torch.from_numpy(labels))
