"""Packing, segment ids, the weighted mixture, its determinism and exact resumption."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmodel.data import IGNORE_INDEX, DataError, Mixture, SourceStream, TokenizedDocs, sequential_batches
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


def test_an_epoch_visits_every_window_once_over_the_shuffled_documents():
    docs = make_docs([7, 3, 12, 5, 9, 4])
    seq = 4
    stream = SourceStream(docs, seq, seed=3, index=0, label="s")
    n = stream.windows_per_epoch
    assert n == (len(docs.tokens) - 1) // seq
    windows = [stream.window(j) for j in range(n)]
    assert all(len(w) == seq + 1 for w in windows)
    # Windows tile the epoch's stream: sorted by start they overlap by exactly one token.
    epoch_stream = stream._stream
    starts = sorted(int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(epoch_stream, seq + 1) == w).all(1))[0]) for w in windows)
    assert starts == list(range(0, n * seq, seq))
    # The epoch stream is the documents, each whole, in some order.
    doc_set = {tuple(docs.tokens[s:e]) for s, e in zip(docs.doc_starts, docs.doc_ends)}
    ends = np.flatnonzero(epoch_stream == EOS) + 1
    pieces = {tuple(p) for p in np.split(epoch_stream, ends)[:-1]}
    assert pieces == doc_set
    # The next epoch uses another order.
    second = [stream.window(n + j) for j in range(n)]
    assert any(not np.array_equal(a, b) for a, b in zip(windows, second))


def test_a_source_shorter_than_one_row_is_refused():
    with pytest.raises(DataError, match=r"'tiny' has 6 tokens, fewer than one row of data.seq_len \+ 1 = 9"):
        SourceStream(make_docs([6]), 8, seed=0, index=0, label="tiny")


def mixture(seed: int, weights=(0.6, 0.3, 0.1), seq: int = 8) -> Mixture:
    sources = [make_docs([40, 25, 61, 33], first_token=1000 * (i + 1)) for i in range(len(weights))]
    streams = [SourceStream(d, seq, seed, i, f"s{i}") for i, d in enumerate(sources)]
    return Mixture(streams, list(weights), seed, EOS, document_masking=False)


def test_mixture_is_a_function_of_the_seed():
    a, b, c = mixture(1).next_windows(50), mixture(1).next_windows(50), mixture(2).next_windows(50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mixture_follows_the_weights():
    mix = mixture(0)
    rows = mix.next_windows(6000)
    shares = np.array(mix.rows_per_source()) / 6000
    np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.025)
    sources = rows.max(axis=1) // 1000 - 1  # source i has token ids from 1000 * (i + 1) on (and EOS)
    np.testing.assert_array_equal(np.bincount(sources, minlength=3), mix.rows_per_source())


@settings(max_examples=25, deadline=None)
@given(first=st.integers(0, 9000), count=st.integers(1, 40))
def test_resuming_from_a_position_continues_the_same_rows(first, count):
    uninterrupted = mixture(7)
    uninterrupted.next_windows(first)
    saved = uninterrupted.state_dict()
    expected = uninterrupted.next_windows(count)
    resumed = mixture(7)
    resumed.load_state_dict(saved)
    np.testing.assert_array_equal(resumed.next_windows(count), expected)
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_sequential_batches_predict_every_token_once():
    docs = make_docs([9, 4, 13, 6])
    batches = list(sequential_batches(docs, seq_len=5, rows=3, pad_id=3))
    labels = np.concatenate([b.labels.numpy().ravel() for b in batches])
    predicted = labels[labels != IGNORE_INDEX]
    np.testing.assert_array_equal(predicted, docs.tokens[1:])
    inputs = np.concatenate([b.input_ids.numpy().ravel() for b in batches])
    np.testing.assert_array_equal(inputs[labels != IGNORE_INDEX], docs.tokens[:-1])
    assert len(list(sequential_batches(docs, seq_len=5, rows=3, pad_id=3, max_batches=1))) == 1
