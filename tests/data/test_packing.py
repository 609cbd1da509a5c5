"""Packing windows into batches, segment ids, and the evaluation batches."""

from __future__ import annotations

import numpy as np

from kmodel.data import IGNORE_INDEX, TokenizedDocs, sequential_batches
from kmodel.data.packing import rows_to_batch, segment_ids

EOS = 2


def make_docs(lengths: list[int], first_token: int = 10) -> TokenizedDocs:
    """Documents of distinct, increasing token ids, each ending in EOS."""
    pieces, token = [], first_token
    for n in lengths:
        pieces.append(np.arange(token, token + n - 1, dtype=np.int32))
        pieces.append(np.array([EOS], dtype=np.int32))
        token += n - 1
    return TokenizedDocs(np.concatenate(pieces), np.cumsum(lengths), sum(lengths))


def test_labels_are_next_tokens_and_segments_follow_eos():
    window = np.array([[5, 6, EOS, 7, 8, EOS, 9]])
    batch = rows_to_batch(window, EOS, document_masking=True)
    assert batch.input_ids.tolist() == [[5, 6, EOS, 7, 8, EOS]]
    assert batch.labels.tolist() == [[6, EOS, 7, 8, EOS, 9]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1]]  # an EOS belongs to the document it ends
    assert rows_to_batch(window, EOS, document_masking=False).segment_ids is None
    assert segment_ids(np.array([[EOS, 4, EOS, EOS]]), EOS).tolist() == [[0, 1, 1, 2]]


def test_sequential_batches_predict_every_token_once():
    docs = make_docs([9, 4, 13, 6])
    batches = list(sequential_batches(docs, seq_len=5, rows=3, pad_id=3))
    labels = np.concatenate([b.labels.numpy().ravel() for b in batches])
    predicted = labels[labels != IGNORE_INDEX]
    np.testing.assert_array_equal(predicted, docs.tokens[1:])
    inputs = np.concatenate([b.input_ids.numpy().ravel() for b in batches])
    np.testing.assert_array_equal(inputs[labels != IGNORE_INDEX], docs.tokens[:-1])
    assert len(list(sequential_batches(docs, seq_len=5, rows=3, pad_id=3, max_batches=1))) == 1
