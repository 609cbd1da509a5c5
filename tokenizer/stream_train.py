"""Training on corpora larger than memory: a one-pass, seeded, language-weighted sample, then one of two
BPE learners, both producing the same kind of kmodel tokenizer (a SentencePiece model plus tokenizer.json).

Sampling. The input files are read line by line (JSON Lines) and never held whole. Each document gets a
random key from a seeded generator; per mix entry the sampler keeps the documents with the smallest keys
whose characters fit the entry's share of `sample_chars` (a bounded heap), which is a uniform sample
without replacement. A mix entry is a language (the `lang` field) or a builder source (the name before the
`:` of the `source` field): a document is sampled under its source when the mix names it, else under its
language, so one source can be given its own share (or 0, to leave it out) apart from the rest of its
language. After the pass the mix is made exact the way `corpus.draw_sample` does it: the entry in shortest
supply for its weight sets the total and the others are trimmed to their share.

Learners (`backend`):

- `sentencepiece`: SentencePiece's BPE trainer, with the settings of `train.py`;
- `hf`: Hugging Face `tokenizers` BPE (Rust, parallel over RAYON_NUM_THREADS), run on the same NFC text
  with spaces written as U+2581, pre-split so that its pieces obey SentencePiece's rules (a piece never
  crosses a space-led word or a script change, digits stay single). Its merges become a SentencePiece BPE
  model: merge k creates the piece of score -k, the alphabet follows, so SentencePiece's "merge the adjacent
  pair whose concatenation scores best" replays the learned order. One runtime serves both learners, and
  the Hugging Face export and its parity tests apply unchanged.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as model_pb2

from . import special_tokens
from .corpus import REPO_ROOT, display_path, parse_mix
from .corpus_build import corpus_provenance, corpus_root
from .errors import TokenizerError
from .tokenizer import (
    SPACE_SYMBOL,
    Tokenizer,
)
from .train import (
    DEFAULT_CHARACTER_COVERAGE,
    MAX_SENTENCE_BYTES,
    _metadata,
    _run_sentencepiece,
    _validate_options,
    _write_tokenizer_dir,
    trainer_sentences,
)

BACKENDS = ("hf", "sentencepiece")
DEFAULT_BACKEND = "hf"  # chosen by measurement: bench/results/tokenizer_backends.md
DEFAULT_SAMPLE_CHARS = 200_000_000
MAX_PIECE_CHARS = 16  # SentencePiece's default max_piece_length, kept for both learners

# The pre-split of the `hf` learner, on text whose spaces are U+2581: a space run gives all but its last
# space to a whitespace-only piece, the last one leads the next word; a word is a run of one script's letters
# (with combining marks) led by a space, one or two punctuation characters or a space and one punctuation
# character (`.append`, ` (see`, `("대화`, `\cs`); a Hangul word may end in one of . , ? ! and newlines, so
# Korean sentence and clause endings (`니다.\n`, `다,`) can become pieces. Otherwise a single digit, or a run of
# punctuation/symbols that may end in newlines; other whitespace (newlines, tabs) forms runs of its own. A
# space never follows another character inside a piece, as SentencePiece requires. Chosen by measurement
# (docs/tokenizer.md, "The pre-split").
_S = SPACE_SYMBOL
_PUNCT = rf"[^\p{{L}}\p{{M}}\p{{N}}\s{_S}]"  # one punctuation or symbol character
HF_PRESPLIT = (
    rf"{_S}+(?={_S})"
    rf"|(?:{_S}|{_PUNCT}{{1,2}}|{_S}{_PUNCT})?(?:\p{{Hangul}}[\p{{Hangul}}\p{{M}}]*[.,?!]?[\r\n]*|\p{{Han}}+"
    rf"|[\p{{Hiragana}}\p{{Katakana}}ー]+|\p{{Latin}}[\p{{Latin}}\p{{M}}]*|\p{{L}}[\p{{L}}\p{{M}}]*)"
    rf"|{_S}?\p{{N}}"
    rf"|{_S}?{_PUNCT}+[\r\n]*"
    rf"|\s+"
    rf"|{_S}+"
)


# Streaming and sampling.


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise TokenizerError(f"corpus file {path} does not exist" if not path.exists() else f"{path} is not a file")


def stream_documents(path: Path, digest=None) -> Iterator[tuple[str, str, str]]:
    """(lang, source name, NFC text) of each JSON Lines record of `path`, read line by line; the source name is
    the `source` field up to its first `:` ("" without one). Every byte read also goes into `digest` (a
    hashlib object) when given, so the file is hashed in the same pass."""
    _check_file(path)
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if digest is not None:
                digest.update(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise TokenizerError(f"{path}:{line_number}: not valid JSON: {error}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record.get("lang"):
                raise TokenizerError(f"{path}:{line_number}: expected an object with string 'text' and 'lang'")
            source = record.get("source")
            source_name = source.split(":", 1)[0] if isinstance(source, str) else ""
            yield record["lang"], source_name, unicodedata.normalize("NFC", record["text"])


class LanguageSample:
    """The documents of one mix entry with the smallest random keys whose characters fit `quota`."""

    def __init__(self, quota: float):
        self.quota = quota
        self.heap: list[tuple[float, int, str]] = []  # (-key, order, text): the largest key on top
        self.characters = 0
        self.seen_characters = 0
        self.seen_documents = 0

    def offer(self, key: float, order: int, text: str) -> None:
        self.seen_characters += len(text)
        self.seen_documents += 1
        if self.characters >= self.quota and self.heap and key > -self.heap[0][0]:
            return
        heapq.heappush(self.heap, (-key, order, text))
        self.characters += len(text)
        self.trim(self.quota)

    def trim(self, quota: float) -> None:
        """Drop the largest keys while the rest still reaches `quota` without them."""
        while self.heap and self.characters - len(self.heap[0][2]) >= quota:
            self.characters -= len(heapq.heappop(self.heap)[2])


def portable_path(path: Path) -> str:
    """How metadata names an input file without machine paths: relative to the repository when inside it,
    else relative to the built corpus it belongs to (`train/code_c.jsonl`), else by its name."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(REPO_ROOT):
        return display_path(resolved)
    root = corpus_root(resolved)
    return resolved.relative_to(root).as_posix() if root else resolved.name


def training_command(out_dir: Path, paths: list[Path], settings: dict) -> str:
    """The `kmodel tokenizer train` line that retrains a tokenizer from `settings`, its inputs named as in the
    metadata: a built corpus as CORPUS (its whole train/ part as CORPUS/train/*.jsonl)."""
    roots = {corpus_root(path) for path in paths}
    if len(roots) == 1 and None not in roots:
        root = roots.pop()
        whole_train = {path.resolve() for path in paths} == {path.resolve() for path in (root / "train").glob("*.jsonl")}
        inputs = ["CORPUS/train/*.jsonl"] if whole_train else [f"CORPUS/{portable_path(path)}" for path in paths]
    else:
        inputs = [portable_path(path) for path in paths]
    mix = ",".join(f"{entry}={weight:g}" for entry, weight in settings["mix"].items())
    return " ".join([
        "kmodel tokenizer train --stream", f"--backend {settings['backend']}", *(["--upsample"] * settings["upsample"]),
        f"--mix {mix}", f"--vocab-size {settings['vocab_size']}", f"--sample-chars {settings['sample_chars']}",
        f"--character-coverage {settings['character_coverage']:g}", f"--seed {settings['seed']}",
        "--input", *inputs, "--out", portable_path(out_dir),
    ])  # fmt: skip


def mix_entry(lang: str, source: str, mix: dict[str, float]) -> str:
    """The mix entry a document is sampled under: its source when the mix names it, else its language."""
    return source if source in mix else lang


def sample_corpus(
    paths: list[Path], mix: dict[str, float], sample_chars: int, seed: int, upsample: bool = False
) -> tuple[list[str], dict]:
    """One pass over `paths`: the texts of the sample, in a seeded order, and its record. `mix` weighs
    languages and sources (`mix_entry`); an entry weighted 0 or absent is left out.

    Without `upsample` the entry in shortest supply for its weight sets the total. With it, every entry gets
    its share of `sample_chars`, one with less text than its share being repeated a whole number of times
    (the nearest to its share): its pairs then weigh in BPE as if it had that much text."""
    rng = random.Random(seed)
    weights = {entry: weight for entry, weight in mix.items() if weight > 0}
    samples = {entry: LanguageSample(weight * sample_chars) for entry, weight in weights.items()}
    files, excluded, sources, order = [], Counter(), set(), 0
    for path in paths:
        digest, documents, characters = hashlib.sha256(), 0, 0
        for lang, source, text in stream_documents(path, digest):
            documents += 1
            characters += len(text)
            entry = mix_entry(lang, source, mix)
            if entry not in samples:
                excluded[entry] += 1
                continue
            if text:
                samples[entry].offer(rng.random(), order, text)
                sources.add(source)
                order += 1
        files.append({"path": portable_path(path), "sha256": digest.hexdigest(), "documents": documents,
                      "characters": characters})  # fmt: skip
    missing = [entry for entry, sample in samples.items() if not sample.seen_documents]
    if missing:
        raise TokenizerError(
            f"--mix asks for language(s) or source(s) {', '.join(map(repr, missing))} but "
            f"{', '.join(display_path(p) for p in paths)} has none"
        )
    if upsample:
        total = sample_chars
    else:
        total = min(sample_chars, *(samples[entry].seen_characters / weight for entry, weight in weights.items()))
    for entry, sample in samples.items():
        sample.trim(weights[entry] * total)
    repeats = {
        entry: max(1, round(weights[entry] * total / sample.characters)) if upsample else 1
        for entry, sample in samples.items()
    }
    drawn = sorted((order, lang, text) for lang, sample in samples.items() for _, order, text in sample.heap)
    texts = [text for _, lang, text in drawn for _ in range(repeats[lang])]  # repeats share the str object
    digest = hashlib.sha256("\0".join(text for _, _, text in drawn).encode("utf-8")).hexdigest()
    record = {
        "files": files,
        "sample": {
            "sha256": digest,
            "sample_chars": sample_chars,
            "upsample": upsample,
            "characters_by_lang": {lang: samples[lang].characters for lang in sorted(samples)},
            "repeats_by_lang": {lang: repeats[lang] for lang in sorted(samples)},
            "documents_by_lang": {lang: len(samples[lang].heap) for lang in sorted(samples)},
            "excluded_documents_by_lang": dict(sorted(excluded.items())),
            "sources": sorted(source for source in sources if source),
        },
    }
    return texts, record


# The Hugging Face learner and its conversion to a SentencePiece model.


def alphabet_for_coverage(texts: Iterable[str], coverage: float) -> list[str]:
    """The most frequent characters (spaces as U+2581) that together make up `coverage` of all characters."""
    counts = Counter()
    for text in texts:
        counts.update(text.replace(" ", SPACE_SYMBOL))
    total, covered, alphabet = sum(counts.values()), 0, []
    for char, count in counts.most_common():
        if covered >= coverage * total:
            break
        alphabet.append(char)
        covered += count
    return alphabet


def learn_hf_merges(texts: list[str], learned_pieces: int, alphabet: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned by Hugging Face `tokenizers` over `texts`, in order."""
    try:
        from tokenizers import (
            Regex,
            Tokenizer,
            models,
            normalizers,
            pre_tokenizers,
            trainers,
        )
    except ImportError:
        raise TokenizerError(
            "--backend hf needs the Hugging Face `tokenizers` package (pip install 'tokenizers>=0.23', part of "
            "kmodel[dev]); or train with --backend sentencepiece"
        ) from None

    hf = Tokenizer(models.BPE())
    hf.normalizer = normalizers.Replace(" ", SPACE_SYMBOL)
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(HF_PRESPLIT), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + learned_pieces,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        max_token_length=MAX_PIECE_CHARS,
    )
    hf.train_from_iterator(trainer_sentences(texts), trainer, length=None)
    merges = json.loads(hf.to_str())["model"]["merges"]
    return [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1)) for merge in merges]


def sentencepiece_bpe_model(merges: list[tuple[str, str]], alphabet: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model (serialized) with kmodel's settings whose pieces are the special tokens, the
    256 byte pieces, the merged pieces in merge order and then the alphabet, cut to `vocab_size`."""
    model = model_pb2.ModelProto()
    spec = model.trainer_spec
    spec.model_type = model_pb2.TrainerSpec.BPE
    spec.vocab_size = vocab_size
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.max_sentence_length = MAX_SENTENCE_BYTES
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, -1, -1, -1
    spec.user_defined_symbols.extend(special_tokens.USER_DEFINED)
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True

    Piece = model_pb2.ModelProto.SentencePiece
    pieces = [(special_tokens.UNK, 0.0, Piece.UNKNOWN)]
    pieces += [(token, 0.0, Piece.USER_DEFINED) for token in special_tokens.USER_DEFINED]
    pieces += [(f"<0x{byte:02X}>", 0.0, Piece.BYTE) for byte in range(256)]
    taken = {piece for piece, _, _ in pieces}
    learned = [left + right for left, right in merges]
    budget = vocab_size - len(pieces) - len(alphabet)
    if budget < 0:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is too small: the alphabet ({len(alphabet)} characters) and "
            f"{len(pieces)} special and byte pieces need more"
        )
    for rank, piece in enumerate(learned[:budget]):
        if piece not in taken:
            pieces.append((piece, -float(rank), Piece.NORMAL))
            taken.add(piece)
    for position, char in enumerate(alphabet):
        if char not in taken:
            pieces.append((char, -float(len(learned) + position), Piece.NORMAL))
            taken.add(char)
    for piece, score, kind in pieces:
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    spec.vocab_size = len(pieces)
    return model.SerializeToString()


# The entry point.


def train_streaming(
    out_dir: str | Path,
    inputs: Iterable[str | Path],
    *,
    vocab_size: int,
    mix: str | dict[str, float],
    backend: str = DEFAULT_BACKEND,
    sample_chars: int = DEFAULT_SAMPLE_CHARS,
    character_coverage: float = DEFAULT_CHARACTER_COVERAGE,
    seed: int = 0,
    num_threads: int | None = None,
    upsample: bool = False,
) -> Tokenizer:
    """Sample `inputs` in one streaming pass, learn a BPE vocabulary with `backend` and write a kmodel
    tokenizer directory to `out_dir`; returns the loaded Tokenizer."""
    _validate_options(vocab_size, "bpe", character_coverage)
    if backend not in BACKENDS:
        raise TokenizerError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if isinstance(sample_chars, bool) or not isinstance(sample_chars, int) or sample_chars <= 0:
        raise TokenizerError(f"--sample-chars must be a positive integer, got {sample_chars!r}")
    weights = parse_mix(mix, keep_zero=True)
    paths = [Path(path) for path in inputs]
    if not paths:
        raise TokenizerError("no input files given")
    threads = num_threads or os.cpu_count() or 1

    started = time.perf_counter()
    texts, corpus_record = sample_corpus(paths, weights, sample_chars, seed, upsample)
    sampled = time.perf_counter()
    if backend == "sentencepiece":
        description = f"{sum(map(len, texts)):,} sampled characters from {', '.join(map(display_path, paths))}"
        model_bytes = _run_sentencepiece(
            trainer_sentences(texts),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=character_coverage,
            morpheme_aware=False,
            num_threads=threads,
            corpus_description=description,
        )
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        alphabet = alphabet_for_coverage(texts, character_coverage)
        reserved = len(special_tokens.ALL) + 256
        merges = learn_hf_merges(texts, vocab_size - reserved - len(alphabet), alphabet)
        if reserved + len(alphabet) + len(merges) < vocab_size:
            raise TokenizerError(
                f"--vocab-size {vocab_size} is more than this corpus supports: only {len(merges):,} merges of pairs "
                f"seen twice exist in the {sum(map(len, texts)):,}-character sample; use a smaller vocabulary, "
                f"more text or a larger --sample-chars"
            )
        model_bytes = sentencepiece_bpe_model(merges, alphabet, vocab_size)
    finished = time.perf_counter()

    metadata = _metadata(
        model_bytes,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=character_coverage,
        morpheme_aware=False,
        mix=weights,
        max_characters=None,
        seed=seed,
        corpus=corpus_record,
        training_seconds=finished - started,
    )
    metadata["settings"].update(
        {"backend": backend, "sample_chars": sample_chars, "upsample": upsample, "streaming": True}
    )
    if backend == "hf":
        import tokenizers

        metadata["settings"]["hf_presplit"] = HF_PRESPLIT
        metadata["tokenizers_version"] = tokenizers.__version__
    metadata["timing"] = {"sampling_seconds": round(sampled - started, 2), "learning_seconds": round(finished - sampled, 2)}
    metadata["settings"]["command"] = training_command(Path(out_dir), paths, metadata["settings"])
    roots = {corpus_root(path) for path in paths}
    if len(roots) == 1 and None not in roots:
        metadata["corpus"]["build"] = corpus_provenance(roots.pop(), corpus_record["sample"]["sources"])
    return _write_tokenizer_dir(out_dir, model_bytes, metadata)

