"""Tokenizer comparison for the derivation test: which tokens two models share, under which ids, and
whether one vocabulary extends the other.

A tokenizer is read from a directory or file: Hugging Face `tokenizer.json` (vocab, merges, added
tokens), a SentencePiece `tokenizer.model`, or `vocab.json` (+ `merges.txt`). kmodel tokenizer
directories hold both of the first two; `tokenizer.json` is preferred because it carries the merges.

Sharing a vocabulary is weak evidence on its own (BPE trained the same way on the same text gives the
same vocabulary), so the comparison is reported next to, not inside, the weight test; its role there is
to pair the embedding rows of the two models token by token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class VocabError(ValueError):
    """A tokenizer file that cannot be read."""


@dataclass
class Vocab:
    source: str
    tokens: dict[int, str]  # id -> token string
    merges: list[str] | None  # BPE merges in priority order ("a b"), when the format has them

    @property
    def size(self) -> int:
        return max(self.tokens) + 1 if self.tokens else 0

    def ids(self) -> dict[str, int]:
        return {token: index for index, token in self.tokens.items()}


def load_vocab(path: str | Path) -> Vocab:
    """The vocabulary of a tokenizer directory or file."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "tokenizer.json", path / "tokenizer.model", path / "vocab.json"]
    for file in candidates:
        if not file.is_file():
            continue
        if file.suffix == ".model":
            return _sentencepiece_vocab(file)
        if file.name == "vocab.json":
            return _vocab_json(file)
        return _tokenizer_json(file)
    raise VocabError(f"no tokenizer at {path} (looked for tokenizer.json, tokenizer.model, vocab.json)")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise VocabError(f"cannot read {file}: {error}") from None


def _merge_text(merge: Any) -> str:
    return merge if isinstance(merge, str) else " ".join(merge)


def _tokenizer_json(file: Path) -> Vocab:
    data = _read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise VocabError(f"{file} has no model.vocab; not a Hugging Face tokenizer.json")
    vocab = model["vocab"]
    if isinstance(vocab, dict):
        tokens = {int(index): token for token, index in vocab.items()}
    else:  # Unigram: a list of [piece, score], the id is the position
        tokens = {index: entry[0] for index, entry in enumerate(vocab)}
    for added in data.get("added_tokens") or []:
        tokens[int(added["id"])] = added["content"]
    merges = model.get("merges")
    return Vocab(str(file), tokens, None if merges is None else [_merge_text(m) for m in merges])


def _vocab_json(file: Path) -> Vocab:
    vocab = _read_json(file)
    if not isinstance(vocab, dict):
        raise VocabError(f"{file} is not a token -> id mapping")
    merges_file = file.with_name("merges.txt")
    merges = None
    if merges_file.is_file():
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
    return Vocab(str(file), {int(i): t for t, i in vocab.items()}, merges)


def _sentencepiece_vocab(file: Path) -> Vocab:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(file))
    except (OSError, RuntimeError) as error:
        raise VocabError(f"{file} is not a SentencePiece model: {error}") from None
    return Vocab(str(file), {i: processor.IdToPiece(i) for i in range(processor.GetPieceSize())}, None)


def shared_token_ids(a: Vocab, b: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids in A and in B of every token string both vocabularies contain, ordered by A's id."""
    b_ids = b.ids()
    pairs = sorted((index, b_ids[token]) for index, token in a.tokens.items() if token in b_ids)
    ids_a = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    ids_b = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return ids_a, ids_b


def _common_prefix(x: list, y: list) -> int:
    n = 0
    for left, right in zip(x, y):
        if left != right:
            break
        n += 1
    return n


def compare_vocabs(a: Vocab, b: Vocab) -> dict[str, Any]:
    """Overlap, same-id ratio, and the prefix tests that reveal an extended vocabulary: B extends A when
    A's id -> token table (or A's merge list) is a prefix of B's."""
    ids_a, ids_b = shared_token_ids(a, b)
    shared = len(ids_a)
    union = len(set(a.tokens.values()) | set(b.tokens.values()))
    same_id = int((ids_a == ids_b).sum()) if shared else 0
    table_a = [a.tokens.get(i) for i in range(a.size)]
    table_b = [b.tokens.get(i) for i in range(b.size)]
    id_prefix = _common_prefix(table_a, table_b)
    result: dict[str, Any] = {
        "size_a": len(a.tokens),
        "size_b": len(b.tokens),
        "shared_tokens": shared,
        "jaccard": shared / union if union else 0.0,
        "shared_fraction_of_a": shared / len(a.tokens) if a.tokens else 0.0,
        "shared_fraction_of_b": shared / len(b.tokens) if b.tokens else 0.0,
        "same_id_fraction": same_id / shared if shared else 0.0,
        "common_id_prefix": id_prefix,
    }
    if a.merges is not None and b.merges is not None:
        result["merges_a"], result["merges_b"] = len(a.merges), len(b.merges)
        result["common_merge_prefix"] = _common_prefix(a.merges, b.merges)
    result["relation"] = _relation(result, len(table_a), len(table_b))
    return result


def _relation(result: dict[str, Any], size_a: int, size_b: int) -> str:
    merge_prefix = result.get("common_merge_prefix")
    merges_a, merges_b = result.get("merges_a"), result.get("merges_b")
    prefix = result["common_id_prefix"]
    if prefix == size_a == size_b and (merge_prefix is None or merge_prefix == merges_a == merges_b):
        return "identical"
    if prefix == size_a < size_b or (merge_prefix is not None and 0 < merge_prefix == merges_a < merges_b):
        return "B extends A"
    if prefix == size_b < size_a or (merge_prefix is not None and 0 < merge_prefix == merges_b < merges_a):
        return "A extends B"
    if result["shared_tokens"] == 0:
        return "disjoint"
    return "different"
