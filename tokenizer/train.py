"""Train a kmodel tokenizer: a SentencePiece model on a language-weighted sample of the corpus.

The settings below are chosen by measurement (`python -P -m kmodel.tokenizer.sweep`, see docs/tokenizer.md):

- normalisation: NFC done by kmodel, SentencePiece's `identity` rule (its default `nmt_nfkc` rewrites
  compatibility jamo and symbols such as ㅋ, ㈜, ① irreversibly);
- byte fallback: a character outside the vocabulary becomes its UTF-8 bytes, so nothing is ever unknown;
- digits split into single-digit pieces; whitespace kept as is (no collapsing, no dummy prefix), with runs of
  spaces allowed to form one piece, which keeps code indentation cheap and makes decode the exact inverse;
- the special tokens of `special_tokens.py` as user-defined symbols.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece

from . import special_tokens
from .corpus import (
    DEFAULT_MIX,
    default_training_files,
    display_path,
    draw_sample,
    parse_mix,
    read_corpus_file,
)
from .errors import TokenizerError
from .morphemes import MORPHEME_DELIMITER, mark_morpheme_boundaries
from .tokenizer import (
    HF_TOKENIZER_FILE,
    METADATA_FILE,
    METADATA_FORMAT,
    MODEL_FILE,
    Tokenizer,
)

MODEL_TYPES = ("bpe", "unigram")
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MODEL_TYPE = "bpe"
DEFAULT_CHARACTER_COVERAGE = 0.9999
MAX_VOCAB_SIZE = 262144
# The unknown piece, the special tokens and the 256 byte pieces come before any learned piece.
RESERVED_PIECES = len(special_tokens.ALL) + 256
# SentencePiece silently drops training "sentences" longer than max_sentence_length bytes, so documents are
# cut into chunks of at most this many bytes at line ends.
MAX_SENTENCE_BYTES = 8192

_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def trainer_sentences(texts: Iterable[str], max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Cut texts into chunks of at most `max_bytes` UTF-8 bytes, at line ends where possible. Newlines stay
    in the chunks, so the tokenizer learns them the way it will meet them."""
    for text in texts:
        chunk, chunk_bytes = [], 0
        for line in _short_lines(text, max_bytes):
            line_bytes = len(line.encode("utf-8"))
            if chunk and chunk_bytes + line_bytes > max_bytes:
                yield "".join(chunk)
                chunk, chunk_bytes = [], 0
            chunk.append(line)
            chunk_bytes += line_bytes
        if chunk:
            yield "".join(chunk)


def _short_lines(text: str, max_bytes: int) -> Iterator[str]:
    """The lines of `text` (newlines kept), with any line over `max_bytes` cut at character boundaries."""
    for line in text.splitlines(keepends=True):
        while len(line.encode("utf-8")) > max_bytes:
            cut, size = 0, 0
            while size + len(line[cut].encode("utf-8")) <= max_bytes:
                size += len(line[cut].encode("utf-8"))
                cut += 1
            yield line[:cut]
            line = line[cut:]
        if line:
            yield line


def _validate_options(vocab_size: int, model_type: str, character_coverage: float) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TokenizerError(f"--vocab-size must be an integer, got {vocab_size!r}")
    if not RESERVED_PIECES < vocab_size <= MAX_VOCAB_SIZE:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is outside the supported range: more than {RESERVED_PIECES} "
            f"(special tokens + 256 byte pieces) and at most {MAX_VOCAB_SIZE}"
        )
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"--model-type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if not 0.9 <= character_coverage <= 1.0:
        raise TokenizerError(f"--character-coverage {character_coverage} must lie in [0.9, 1.0]")


def train_tokenizer(
    out_dir: str | Path,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    mix: str | dict[str, float] = DEFAULT_MIX,
    inputs: Iterable[str | Path] | None = None,
    model_type: str = DEFAULT_MODEL_TYPE,
    character_coverage: float = DEFAULT_CHARACTER_COVERAGE,
    morpheme_aware: bool = False,
    max_characters: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    skip_invalid_lines: bool = False,
) -> Tokenizer:
    """Train a tokenizer on `inputs` (default: the bundled train split) and write it to `out_dir`.

    Writes `tokenizer.model`, `metadata.json` and `tokenizer.json`; returns the loaded Tokenizer. Bad input
    (missing or malformed file, empty corpus, unknown --mix language, a vocabulary the corpus cannot fill)
    raises TokenizerError or FileNotFoundError with the culprit named."""
    _validate_options(vocab_size, model_type, character_coverage)
    weights = parse_mix(mix)
    paths = [Path(p) for p in inputs] if inputs is not None else default_training_files()
    if not paths:
        raise TokenizerError("no input files given")
    files = [read_corpus_file(path, skip_invalid_lines=skip_invalid_lines) for path in paths]
    sample = draw_sample(files, weights, seed=seed, max_characters=max_characters)

    texts = [document.text for document in sample.documents]
    if morpheme_aware:
        korean = [position for position, document in enumerate(sample.documents) if document.lang == "ko"]
        for position, marked in zip(korean, mark_morpheme_boundaries([texts[p] for p in korean])):
            texts[position] = marked

    started = time.perf_counter()
    model_bytes = _run_sentencepiece(
        trainer_sentences(texts),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        morpheme_aware=morpheme_aware,
        num_threads=num_threads or os.cpu_count() or 1,
        corpus_description=f"{sample.characters:,} sampled characters from {', '.join(display_path(p) for p in paths)}",
    )
    training_seconds = time.perf_counter() - started

    metadata = _metadata(
        model_bytes,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        morpheme_aware=morpheme_aware,
        mix=weights,
        max_characters=max_characters,
        seed=seed,
        corpus={"files": [corpus_file.describe() for corpus_file in files], "sample": sample.describe()},
        training_seconds=training_seconds,
    )
    return _write_tokenizer_dir(out_dir, model_bytes, metadata)


def _write_tokenizer_dir(out_dir: str | Path, model_bytes: bytes, metadata: dict) -> Tokenizer:
    """Write a trained model and its metadata into `out_dir`, load them back and add tokenizer.json."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(model_bytes)
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tok = Tokenizer.load(out)

    from .hf_export import write_tokenizer_json

    write_tokenizer_json(tok, out / HF_TOKENIZER_FILE)
    return tok


def _run_sentencepiece(
    sentences: Iterator[str],
    *,
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    morpheme_aware: bool,
    num_threads: int,
    corpus_description: str,
) -> bytes:
    model = io.BytesIO()
    options = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "character_coverage": character_coverage,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "byte_fallback": True,
        "split_digits": True,
        "allow_whitespace_only_pieces": True,
        "unk_id": 0,
        "bos_id": -1,
        "eos_id": -1,
        "pad_id": -1,
        "user_defined_symbols": list(special_tokens.USER_DEFINED),
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "num_threads": num_threads,
        "minloglevel": 2,
    }
    if morpheme_aware:
        options["pretokenization_delimiter"] = MORPHEME_DELIMITER
    try:
        sentencepiece.SentencePieceTrainer.Train(sentence_iterator=sentences, model_writer=model, **options)
    except RuntimeError as error:
        message = str(error)
        if match := _TOO_LARGE.search(message):
            raise TokenizerError(
                f"--vocab-size {vocab_size} is more than this corpus supports for a {model_type} model: at most "
                f"{match.group(2)} pieces can be learned from {corpus_description}. Use a smaller vocabulary or "
                f"more text"
            ) from None
        if match := _TOO_SMALL.search(message):
            raise TokenizerError(
                f"--vocab-size {vocab_size} is too small: at character coverage {character_coverage} the alphabet "
                f"and the special pieces alone need {match.group(2)} ids. Use a larger vocabulary or a lower "
                f"--character-coverage"
            ) from None
        raise TokenizerError(f"SentencePiece training failed on {corpus_description}: {message}") from None
    return model.getvalue()


def _metadata(
    model_bytes: bytes,
    *,
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    morpheme_aware: bool,
    mix: dict[str, float],
    max_characters: int | None,
    seed: int,
    corpus: dict,
    training_seconds: float,
) -> dict:
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(model_bytes)
    return {
        "format": METADATA_FORMAT,
        "model_file": MODEL_FILE,
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "model_type": model_type,
        "vocab_size": processor.GetPieceSize(),
        "normalization": "NFC",
        "special_tokens": {token: processor.PieceToId(token) for token in special_tokens.ALL},
        "bos_token": special_tokens.BOS,
        "eos_token": special_tokens.EOS,
        "pad_token": special_tokens.PAD,
        "unk_token": special_tokens.UNK,
        "settings": {
            "vocab_size": vocab_size,
            "model_type": model_type,
            "character_coverage": character_coverage,
            "morpheme_aware": morpheme_aware,
            "mix": mix,
            "max_characters": max_characters,
            "seed": seed,
            "sentencepiece_rule": "identity",
            "byte_fallback": True,
            "split_digits": True,
            "remove_extra_whitespaces": False,
            "add_dummy_prefix": False,
            "allow_whitespace_only_pieces": True,
            "max_sentence_bytes": MAX_SENTENCE_BYTES,
        },
        "corpus": corpus,
        "sentencepiece_version": sentencepiece.__version__,
        "training_seconds": round(training_seconds, 2),
    }
