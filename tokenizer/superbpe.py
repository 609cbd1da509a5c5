"""A SuperBPE-style superword stage, measured against plain BPE of the same total vocabulary.

SuperBPE (the idea behind K-EXAONE's tokenizer) learns BPE in two stages: first ordinary subwords, which never
cross a space, up to a transition size t; then more merges with the space boundary lifted, so frequent word
sequences ("▁수▁있습니다", "▁of▁the") become single tokens, up to the total size T.

Stage 2 here reuses the Rust learner: every stage-1 token is written as one private-use character, the
sample becomes strings of those characters (one per run of space-separated words; punctuation, digits and
newlines still break a run), and Hugging Face BPE learns merges over them. The result is a Hugging Face
`tokenizer.json` whose merge list is stage 1 followed by stage 2, over a pre-split that keeps word runs whole:
every stage-1 merge ranks first, so words form as before, then superword merges join them.

A superword tokenizer cannot be a SentencePiece model (SentencePiece always splits at a space), so it is
measured here, not shipped; see docs/tokenizer.md for the numbers.

    python -P -m kmodel.tokenizer.superbpe --corpus DIR --vocab-size 131072 --transition 114688 \
        --out bench/results/tokenizer_superbpe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import special_tokens
from .errors import TokenizerError
from .size_sweep import heldout_groups, read_texts
from .stream_train import (
    HF_PRESPLIT,
    SPACE_SYMBOL,
    alphabet_for_coverage,
    learn_hf_merges,
    sample_corpus,
)
from .train import DEFAULT_CHARACTER_COVERAGE, trainer_sentences

_S = SPACE_SYMBOL
_WORD = (
    r"(?:\p{Hangul}[\p{Hangul}\p{M}]*|\p{Han}+|[\p{Hiragana}\p{Katakana}ー]+|\p{Latin}[\p{Latin}\p{M}]*"
    r"|\p{L}[\p{L}\p{M}]*)"
)
# A run of words separated by spaces is one pre-token; everything else splits as in stage 1.
SUPERWORD_PRESPLIT = rf"{_S}*{_WORD}(?:{_S}+{_WORD})+|{HF_PRESPLIT}"
MAX_SUPERWORD_TOKENS = 6  # a superword joins at most this many stage-1 tokens
_PRIVATE_USE = (0xF0000, 0x100000)  # supplementary private-use planes A and B, 65,534 code points each


def _token_char(index: int) -> str:
    plane, offset = divmod(index, 65534)
    return chr(_PRIVATE_USE[plane] + offset)


def _char_token(char: str) -> int:
    code = ord(char)
    return code - _PRIVATE_USE[0] if code < _PRIVATE_USE[1] else 65534 + code - _PRIVATE_USE[1]


def hf_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], presplit: str):
    """A Hugging Face BPE tokenizer over kmodel's normalisation (NFC, spaces as U+2581) with byte fallback."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", _S)])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(presplit), behavior="isolated")
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_S, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


def stage1_vocab(alphabet: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab = {token: index for index, token in enumerate(special_tokens.ALL)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in [left + right for left, right in merges] + alphabet:
        vocab.setdefault(piece, len(vocab))
    return vocab


def learn_superword_merges(
    texts: list[str], vocab: dict[str, int], merges: list[tuple[str, str]], count: int
) -> list[tuple[str, str]]:
    """`count` stage-2 merges, learned over the stage-1 tokens of the word runs of `texts`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    stage1 = hf_bpe(vocab, merges, HF_PRESPLIT)
    runs_split = pre_tokenizers.Split(Regex(SUPERWORD_PRESPLIT), behavior="isolated")
    runs = []
    for text in texts:
        normalized = stage1.normalizer.normalize_str(text)
        runs += [piece for piece, _ in runs_split.pre_tokenize_str(normalized) if _S in piece.lstrip(_S)]
    first_learned = len(special_tokens.ALL) + 256  # runs holding a byte-fallback piece are left out
    sequences = [
        "".join(_token_char(index) for index in encoding.ids)
        for encoding in stage1.encode_batch(runs, add_special_tokens=False)
        if min(encoding.ids) >= first_learned
    ]
    alphabet = sorted({char for sequence in sequences for char in sequence})
    learner = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + count, min_frequency=2, show_progress=False, initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), max_token_length=MAX_SUPERWORD_TOKENS,
    )  # fmt: skip
    learner.train_from_iterator(sequences, trainer, length=len(sequences))
    pieces = {index: piece for piece, index in vocab.items()}

    def text_of(token_chars: str) -> str:
        return "".join(pieces[_char_token(char)] for char in token_chars)

    learned = json.loads(learner.to_str())["model"]["merges"]
    return [(text_of(left), text_of(right)) for left, right in (tuple(m) for m in learned)]


def superbpe_tokenizer(texts: list[str], vocab_size: int, transition: int):
    """(plain BPE at `vocab_size`, SuperBPE with `transition` subwords then superwords up to `vocab_size`)."""
    if not 0 < transition < vocab_size:
        raise TokenizerError(f"--transition {transition} must be between 0 and --vocab-size {vocab_size}")
    reserved = len(special_tokens.ALL) + 256
    alphabet = alphabet_for_coverage(texts, DEFAULT_CHARACTER_COVERAGE)
    merges = learn_hf_merges(texts, vocab_size - reserved - len(alphabet), alphabet)
    plain = hf_bpe(stage1_vocab(alphabet, merges), merges, HF_PRESPLIT)
    first = merges[: transition - reserved - len(alphabet)]
    vocab = stage1_vocab(alphabet, first)
    second = learn_superword_merges(texts, vocab, first, vocab_size - len(vocab))
    kept = []
    for left, right in second:
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            kept.append((left, right))
    return plain, hf_bpe(vocab, first + kept, SUPERWORD_PRESPLIT), len(kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="a corpus built by `kmodel tokenizer build-corpus`")
    parser.add_argument("--mix", default="ko=0.35,en=0.35,code=0.3")
    parser.add_argument("--vocab-size", type=int, default=131072)
    parser.add_argument("--transition", type=int, default=114688)
    parser.add_argument("--sample-chars", type=int, default=30_000_000)
    parser.add_argument("--score-chars", type=int, default=300_000)
    parser.add_argument("--out", type=Path, required=True, help="PREFIX for .md and .json")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "2")
    mix = {lang: float(weight) for lang, weight in (item.split("=") for item in args.mix.split(","))}
    texts, _ = sample_corpus(sorted((args.corpus / "train").glob("*.jsonl")), mix, args.sample_chars, 0, upsample=True)
    started = time.perf_counter()
    plain, superbpe, superwords = superbpe_tokenizer(list(trainer_sentences(texts)), args.vocab_size, args.transition)
    seconds = time.perf_counter() - started
    rows = []
    for name, paths in heldout_groups(args.corpus).items():
        documents = read_texts(paths, args.score_chars)
        characters = sum(map(len, documents))
        counts = {label: sum(len(e.ids) for e in tok.encode_batch(documents, add_special_tokens=False))
                  for label, tok in (("plain", plain), ("superbpe", superbpe))}  # fmt: skip
        for label, tok in (("plain", plain), ("superbpe", superbpe)):
            for document in documents[:50]:
                if tok.decode(tok.encode(document).ids, skip_special_tokens=False) != document:
                    raise TokenizerError(f"{label} does not round-trip a document of {name}")
        rows.append({"group": name, "characters": characters,
                     "plain_chars_per_token": characters / counts["plain"],
                     "superbpe_chars_per_token": characters / counts["superbpe"]})  # fmt: skip
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    summary = (
        f"Plain BPE vs SuperBPE at {args.vocab_size:,} pieces (SuperBPE: {args.transition:,} subword pieces, then "
        f"{superwords:,} superwords). Sample {args.sample_chars:,} characters, mix {args.mix}; both learned in "
        f"{seconds:.0f} s. Hugging Face runtime. Load: `{load}`."
    )
    lines = [
        summary,
        "",
        "| held-out group | chars | plain chars/token | SuperBPE chars/token | gain |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        gain = row["superbpe_chars_per_token"] / row["plain_chars_per_token"] - 1
        lines.append(f"| {row['group']} | {row['characters']:,} | {row['plain_chars_per_token']:.3f} | "
                     f"{row['superbpe_chars_per_token']:.3f} | {100 * gain:+.1f}% |")  # fmt: skip
    examples = [superbpe.decode([i]) for i in range(len(superbpe.get_vocab()) - 12, len(superbpe.get_vocab()))]
    lines += ["", "Last superwords learned: " + ", ".join(f"`{e}`" for e in examples)]
    report = {"vocab_size": args.vocab_size, "transition": args.transition, "superwords": superwords,
              "seconds": seconds, "load": load, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
