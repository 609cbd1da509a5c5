"""Packing: token windows into training batches, and held-out files into evaluation batches.

A row is a window of seq_len + 1 consecutive tokens of a packed stream (documents joined, each ending in
EOS): inputs are its first seq_len tokens, labels its last seq_len, so every position predicts the next
token, across document boundaries too (the EOS position predicts the next document's first token).
With document masking, segment ids number the documents inside a row (an EOS belongs to the document it
ends) and the model keeps attention within a document. Which windows, in which order: kmodel.data.order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kmodel.data.tokenized import TokenizedDocs

IGNORE_INDEX = -100


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
