"""The data manifest (file hashes + Merkle root, data identified by content) and the content-keyed token cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from kmodel.config import load_config
from kmodel.data import DataError, check_vocab, data_manifest, file_docs, load_tokenizer, manifest_differences, merkle_root, relocations

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("shipped")


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_merkle_root_matches_the_documented_construction():
    digests = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    leaves = [sha(b"\x00" + bytes.fromhex(d)) for d in digests]
    expected = sha(b"\x01" + sha(b"\x01" + leaves[0] + leaves[1]) + leaves[2])  # the odd leaf moves up
    assert merkle_root(digests) == expected.hex()
    assert merkle_root(digests[:1]) == leaves[0].hex()
    assert merkle_root(digests[::-1]) != merkle_root(digests)  # order is part of the data


def _recipe(tmp_path: Path, files: dict[str, str]) -> object:
    for name, text in files.items():
        (tmp_path / name).write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    return load_config(
        REPO / "recipes/tiny-ko-moe.yaml",
        [f"data.sources=[{{name: a, path: {tmp_path / 'a.jsonl'}}}, {{name: b, path: {tmp_path / 'b.jsonl'}, weight: 2}}]",
         f"data.heldout=[{tmp_path / 'h.jsonl'}]"],
    )


def test_manifest_lists_every_file_and_pins_content(tmp_path):
    cfg = _recipe(tmp_path, {"a.jsonl": "alpha", "b.jsonl": "beta", "h.jsonl": "held"})
    manifest = data_manifest(cfg.data)
    assert [s["name"] for s in manifest["sources"]] == ["a", "b"]
    assert manifest["sources"][1]["weight"] == 2
    entry = manifest["sources"][0]["files"][0]
    assert entry["sha256"] == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    assert manifest["heldout"][0]["path"].endswith("h.jsonl")
    digests = [s["files"][0]["sha256"] for s in manifest["sources"]] + [manifest["heldout"][0]["sha256"]]
    assert manifest["merkle_root"] == merkle_root(digests)

    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "changed"}) + "\n", encoding="utf-8")
    changed = data_manifest(cfg.data)
    assert changed["merkle_root"] != manifest["merkle_root"]
    assert manifest_differences(manifest, changed) == [f"source 'b': {tmp_path / 'b.jsonl'} (changed)"]


def test_manifest_names_a_missing_heldout_file(tmp_path):
    cfg = _recipe(tmp_path, {"a.jsonl": "alpha", "b.jsonl": "beta"})
    with pytest.raises(DataError, match=r"h\.jsonl does not exist"):
        data_manifest(cfg.data)


def test_moved_data_is_the_same_data_and_changed_data_is_named(tmp_path):
    cfg = _recipe(tmp_path, {"a.jsonl": "alpha", "b.jsonl": "beta", "h.jsonl": "held"})
    recorded = data_manifest(cfg.data)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("a.jsonl", "b.jsonl", "h.jsonl"):
        (tmp_path / name).rename(moved / name)
    cfg = _recipe(moved, {})
    current = data_manifest(cfg.data)
    assert manifest_differences(recorded, current) == []
    assert relocations(recorded, current) == [f"{tmp_path / n} -> {moved / n}" for n in ("a.jsonl", "b.jsonl", "h.jsonl")]

    (moved / "b.jsonl").write_text(json.dumps({"text": "changed"}) + "\n", encoding="utf-8")
    assert manifest_differences(recorded, data_manifest(cfg.data)) == [f"source 'b': {tmp_path / 'b.jsonl'} (changed)"]


def test_token_cache_is_reused_keyed_by_content_and_rebuilt_when_damaged(tmp_path, tokenizer):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["안녕하세요", "hello world"]), encoding="utf-8")
    first = file_docs(path, tokenizer, tmp_path)
    entries = list((tmp_path / "tokens").iterdir())
    assert len(entries) == 1
    expected = tokenizer.encode("안녕하세요", add_eos=True) + tokenizer.encode("hello world", add_eos=True)
    assert first.tokens.tolist() == expected
    assert first.doc_ends.tolist() == [len(tokenizer.encode("안녕하세요", add_eos=True)), len(expected)]
    assert first.text_bytes == len("안녕하세요".encode()) + len(b"hello world")

    copy = tmp_path / "elsewhere.jsonl"
    copy.write_bytes(path.read_bytes())
    file_docs(copy, tokenizer, tmp_path)  # the same bytes elsewhere: the same entry
    assert list((tmp_path / "tokens").iterdir()) == entries
    copy.write_text(json.dumps({"text": "other"}) + "\n", encoding="utf-8")
    file_docs(copy, tokenizer, tmp_path)  # other content: another entry
    assert len(list((tmp_path / "tokens").iterdir())) == 2

    for shard in (entries[0] / "shards").glob("*.tokens"):
        shard.write_bytes(b"\xff" * shard.stat().st_size)  # same size, other bytes
    assert file_docs(path, tokenizer, tmp_path).tokens.tolist() == expected  # a damaged entry is rebuilt


def test_file_docs_tokenizes_a_real_file(tmp_path, tokenizer):
    path = REPO / "data/corpus/heldout/en_python_docs.jsonl"
    docs = file_docs(path, tokenizer, tmp_path)
    assert len(docs.doc_ends) == sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line)
    assert docs.tokens.dtype == np.int32 and int(docs.tokens.max()) < tokenizer.vocab_size


def test_vocab_mismatch_names_the_tokenizer(tokenizer):
    check_vocab(tokenizer, tokenizer.vocab_size)
    check_vocab(tokenizer, tokenizer.vocab_size + 64)  # a padded embedding is fine
    with pytest.raises(DataError, match=r"tokenizer .*ko-8k has vocab_size 8192, larger than the model's model\.vocab_size 4096"):
        check_vocab(tokenizer, 4096)
