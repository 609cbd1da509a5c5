"""Hugging Face export: a `tokenizer.json` that gives the same ids as the SentencePiece model.

The JSON is written directly (kmodel does not need the `tokenizers` package at run time). The pipeline
mirrors SentencePiece step by step:

- normaliser: NFC, then space -> U+2581, the same as `Tokenizer.encode` with the `identity` SentencePiece rule;
- pre-tokeniser: split into SentencePiece's "words": a run of U+2581 plus the non-space text after it
  (whitespace-only pieces are allowed, so a run of spaces stays in one word);
- model: BPE whose merge list holds every way of splitting a vocabulary piece into two vocabulary pieces, ranked
  by the piece's score, which makes "apply the best-ranked merge" equal to SentencePiece's "merge the adjacent
  pair whose concatenation scores best"; or Unigram with the piece scores. Both with byte fallback;
- added tokens: the special tokens, matched in raw text like SentencePiece's user-defined symbols.

Known difference: a literal U+2581 in the input is a space to Hugging Face, while `Tokenizer.encode` keeps it
as three byte pieces so that it survives decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import special_tokens
from .tokenizer import HF_TOKENIZER_FILE, SPACE_SYMBOL, Tokenizer

# Score given, in the Unigram export, to byte and unknown pieces: SentencePiece never matches their text
# ("<0x41>", "<unk>") in the input, so they must never win the Viterbi search in the export either.
_UNMATCHABLE_SCORE = -1e9


def tokenizer_json(tok: Tokenizer) -> dict:
    """The `tokenizer.json` document for `tok`."""
    added_tokens = [
        {
            "id": index,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for token, index in sorted(tok.special_tokens.items(), key=lambda item: item[1])
        if token != special_tokens.UNK  # the model's unk_token; SentencePiece never matches "<unk>" text
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [{"type": "NFC"}, {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_SYMBOL}],
        },
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": f"{SPACE_SYMBOL}+[^{SPACE_SYMBOL}]*|[^{SPACE_SYMBOL}]+"},
            "behavior": "Isolated",
            "invert": False,
        },
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE_SYMBOL}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": _bpe_model(tok) if tok.model_type == "bpe" else _unigram_model(tok),
    }


def _is_learned_piece(tok: Tokenizer, index: int) -> bool:
    return not (tok.is_special(index) or tok.is_byte(index))


def _bpe_model(tok: Tokenizer) -> dict:
    pieces = [tok.id_to_piece(index) for index in range(tok.vocab_size)]
    learned = {pieces[index]: index for index in range(tok.vocab_size) if _is_learned_piece(tok, index)}
    ranked_merges = []
    for piece, index in learned.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in learned and right in learned:
                ranked_merges.append((-tok.score(index), index, left, right))
    ranked_merges.sort()
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": special_tokens.UNK,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": {piece: index for index, piece in enumerate(pieces)},
        "merges": [[left, right] for _, _, left, right in ranked_merges],
    }


def _unigram_model(tok: Tokenizer) -> dict:
    vocab = []
    for index in range(tok.vocab_size):
        unmatchable = tok.is_byte(index) or index == tok.unk_id
        vocab.append([tok.id_to_piece(index), _UNMATCHABLE_SCORE if unmatchable else tok.score(index)])
    return {"type": "Unigram", "unk_id": tok.unk_id, "vocab": vocab, "byte_fallback": True}


def write_tokenizer_json(tok: Tokenizer, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(tokenizer_json(tok), ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def export_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable with
    `transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)`. No BOS/EOS is added automatically, the
    same as `Tokenizer.encode`'s defaults."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer_json(tok, out_dir / HF_TOKENIZER_FILE)
    extra = [
        token
        for token in special_tokens.USER_DEFINED
        if token not in (special_tokens.BOS, special_tokens.EOS, special_tokens.PAD)
    ]
    # No unk_token: transformers would then match the text "<unk>" as a token, which SentencePiece never does;
    # with byte fallback nothing is ever unknown anyway.
    special_map = {
        "bos_token": special_tokens.BOS,
        "eos_token": special_tokens.EOS,
        "pad_token": special_tokens.PAD,
        "additional_special_tokens": extra,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "kmodel_tokenizer_sha256": tok.fingerprint(),
    }
    for name, document in (("special_tokens_map.json", special_map), ("tokenizer_config.json", config)):
        (out_dir / name).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir
