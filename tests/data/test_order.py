"""The global row order: table-free permutations, weighted blocks, exact resumption, ranks reading their rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmodel.data import DataError, Mixture
from kmodel.data.order import BLOCK_ROWS, Permutation, block_quotas
from kmodel.data.shards import TokenStream

EOS = 2


def write_stream(folder, label: str, shard_sizes: list[int], first_token: int = 10, doc_len: int = 7) -> TokenStream:
    """A stream of consecutive ids (EOS every `doc_len` tokens), cut into shards of the given sizes."""
    total = sum(shard_sizes)
    tokens = np.arange(first_token, first_token + total, dtype=np.uint16)
    tokens[doc_len - 1 :: doc_len] = EOS
    paths, start = [], 0
    for i, size in enumerate(shard_sizes):
        path = folder / f"{label}-{i}.tokens"
        tokens[start : start + size].tofile(path)
        paths.append(path)
        start += size
    return TokenStream(label, paths, np.array(shard_sizes, dtype=np.int64), np.dtype("<u2"))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), key=st.integers(0, 2**63))
def test_permutation_is_a_bijection(n, key):
    assert sorted(Permutation(n, key)(np.arange(n)).tolist()) == list(range(n))


def test_stream_reads_across_shards_and_wraps_around(tmp_path):
    stream = write_stream(tmp_path, "s", [5, 3, 9], doc_len=100)
    everything = np.arange(10, 27)
    np.testing.assert_array_equal(stream.read(3, 7), everything[3:10])
    np.testing.assert_array_equal(stream.read(14, 6), np.concatenate([everything[14:], everything[:3]]))


def test_a_stream_keeps_a_bounded_number_of_shards_mapped(tmp_path, monkeypatch):
    from kmodel.data import shards

    monkeypatch.setattr(shards, "OPEN_MAPS", 2)
    stream = write_stream(tmp_path, "s", [4] * 6, doc_len=100)
    for start in range(0, 24, 3):
        np.testing.assert_array_equal(stream.read(start, 5), (np.arange(start, start + 5) % 24) + 10)
        assert len(stream._maps) <= 2


def mixture(folder, seed=0, weights=(0.6, 0.3, 0.1), seq=8, stage=0) -> Mixture:
    streams = [write_stream(folder, f"s{i}", [90, 70, 41], first_token=1000 * (i + 1)) for i in range(len(weights))]
    return Mixture(streams, list(weights), seed, seq, EOS, document_masking=True, stage=stage)


def test_an_epoch_visits_every_window_of_a_shifted_grid_once(tmp_path):
    mix = mixture(tmp_path, weights=(1.0,))
    windows = int(mix.windows[0])
    assert windows == (201 - 1) // 8
    sources, starts = mix.locate(np.arange(2 * windows))
    first, second = starts[:windows], starts[windows:]
    shift = int(first.min()) % 8
    assert sorted(first.tolist()) == [shift + 8 * k for k in range(windows)]
    assert sorted(second.tolist()) == [int(second.min()) % 8 + 8 * k for k in range(windows)]
    assert first.tolist() != second.tolist()  # another order (and grid) next epoch


def test_a_source_shorter_than_one_row_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"'tiny' has 6 tokens, fewer than one row of data.seq_len \+ 1 = 9"):
        Mixture([write_stream(tmp_path, "tiny", [6])], [1.0], 0, 8, EOS, False)


def test_a_weight_below_one_row_per_block_is_refused():
    with pytest.raises(DataError, match=r"data source 'rare': its weight is below one row in 4096"):
        block_quotas([1.0, 1e-6], ["common", "rare"])


def test_order_is_a_function_of_seed_and_stage(tmp_path):
    a = mixture(tmp_path).windows_at(np.arange(50))
    np.testing.assert_array_equal(a, mixture(tmp_path).windows_at(np.arange(50)))
    assert not np.array_equal(a, mixture(tmp_path, seed=1).windows_at(np.arange(50)))
    assert not np.array_equal(a, mixture(tmp_path, stage=1).windows_at(np.arange(50)))


def test_every_block_follows_the_weights_exactly(tmp_path):
    mix = mixture(tmp_path)
    quotas = block_quotas([0.6, 0.3, 0.1], ["a", "b", "c"])
    assert quotas.sum() == BLOCK_ROWS and quotas.tolist() == [2458, 1229, 409]
    rows = mix.windows_at(np.arange(BLOCK_ROWS + 100))
    sources = np.where(rows == EOS, 0, rows).max(axis=1) // 1000 - 1  # source i has ids from 1000 * (i + 1) on
    assert np.bincount(sources[:BLOCK_ROWS], minlength=3).tolist() == quotas.tolist()
    assert np.bincount(sources, minlength=3).tolist() == mix.rows_per_source(BLOCK_ROWS + 100)


@settings(max_examples=20, deadline=None)
@given(first=st.integers(0, 3 * BLOCK_ROWS), count=st.integers(1, 40))
def test_resuming_from_a_position_continues_the_same_rows(tmp_path_factory, first, count):
    folder = tmp_path_factory.mktemp("resume")
    uninterrupted = mixture(folder, seed=7)
    uninterrupted.next_batch(first) if first else None
    saved = uninterrupted.state_dict()
    expected = uninterrupted.next_batch(count)
    resumed = mixture(folder, seed=7)
    resumed.load_state_dict(saved)
    np.testing.assert_array_equal(resumed.next_batch(count).input_ids, expected.input_ids)
    assert resumed.state_dict() == uninterrupted.state_dict()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_reading_their_rows_make_up_the_global_batch(tmp_path, world):
    micro_global, steps = 8, 3
    one = mixture(tmp_path, seed=3)
    expected = [one.next_batch(micro_global) for _ in range(steps)]
    ranks = [mixture(tmp_path, seed=3) for _ in range(world)]
    per_rank = micro_global // world
    for step in range(steps):
        parts = [m.next_batch(micro_global, keep=slice(r * per_rank, (r + 1) * per_rank)) for r, m in enumerate(ranks)]
        for field in ("input_ids", "labels", "segment_ids"):
            joined = np.concatenate([getattr(p, field).numpy() for p in parts])
            np.testing.assert_array_equal(joined, getattr(expected[step], field).numpy())


def test_a_stage_starts_a_new_order_and_records_the_stages_before(tmp_path):
    first = mixture(tmp_path, seq=8)
    first.next_batch(100)
    ended = first.state_dict()
    assert ended["summary"]["rows"] == 100 and sum(ended["summary"]["tokens"].values()) == 100 * 8
    assert ended["summary"]["tokens"] == {f"s{i}": n * 8 for i, n in enumerate(first.rows_per_source())}

    def second_stage():
        mix = mixture(tmp_path, weights=(0.2, 0.8), seq=16)  # new weights and seq_len
        mix.start_stage(ended)
        return mix

    second = second_stage()
    assert second.stage == 1 and second.rows_drawn == 0
    assert second.order_record()["previous_stages"] == [ended["summary"]]
    assert second.order_record()["weights"] == {"s0": 0.2, "s1": 0.8} and second.order_record()["seq_len"] == 16
    rows = second.next_batch(10).input_ids
    np.testing.assert_array_equal(rows, second_stage().next_batch(10).input_ids)  # deterministic
    unstaged = mixture(tmp_path, weights=(0.2, 0.8), seq=16)
    assert not np.array_equal(rows, unstaged.next_batch(10).input_ids)  # another order than stage 0's

    saved = second.state_dict()
    expected = second.next_batch(6).input_ids
    resumed = mixture(tmp_path, weights=(0.2, 0.8), seq=16)  # a resume within stage 1 restores the stage
    resumed.load_state_dict(saved)
    assert resumed.stage == 1 and resumed.previous_stages == [ended["summary"]]
    np.testing.assert_array_equal(resumed.next_batch(6).input_ids, expected)
