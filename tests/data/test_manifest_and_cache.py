"""The data manifest (file hashes + Merkle root) and the content-keyed token cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from kmodel.config import load_config
from kmodel.data import DataError, check_vocab, data_manifest, file_docs, load_tokenizer, manifest_differences, merkle_root
from kmodel.data.tokenized import tokenize_cached

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
    assert manifest_differences(manifest, changed) == [f"{tmp_path / 'b.jsonl'} (changed)"]


def test_manifest_names_a_missing_heldout_file(tmp_path):
    cfg = _recipe(tmp_path, {"a.jsonl": "alpha", "b.jsonl": "beta"})
    with pytest.raises(DataError, match=r"h\.jsonl does not exist"):
        data_manifest(cfg.data)


def test_token_cache_is_reused_and_keyed_by_content_and_tokenizer(tmp_path, tokenizer):
    reads = []

    def read():
        reads.append(1)
        return ["안녕하세요", "hello world"]

    first = tokenize_cached("ab" * 32, "text", tokenizer, tmp_path, read)
    again = tokenize_cached("ab" * 32, "text", tokenizer, tmp_path, read)
    assert len(reads) == 1
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.doc_ends, again.doc_ends)
    assert first.tokens[first.doc_ends[0] - 1] == tokenizer.eos_id and first.tokens[-1] == tokenizer.eos_id
    assert first.text_bytes == len("안녕하세요".encode()) + len(b"hello world")
    expected = tokenizer.encode("안녕하세요", add_eos=True) + tokenizer.encode("hello world", add_eos=True)
    assert first.tokens.tolist() == expected

    tokenize_cached("cd" * 32, "text", tokenizer, tmp_path, read)  # other content: another entry
    assert len(reads) == 2
    for entry in (tmp_path / "tokens").glob("*.npz"):
        entry.write_bytes(b"damaged")
    rebuilt = tokenize_cached("ab" * 32, "text", tokenizer, tmp_path, read)  # a damaged entry is rebuilt
    assert len(reads) == 3 and rebuilt.tokens.tolist() == expected


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
