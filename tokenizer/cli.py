"""`kmodel tokenizer train` and `kmodel tokenizer eval`; the main CLI calls `add_commands(subparsers)`."""

from __future__ import annotations

import argparse
import json
import sys

from .corpus import DEFAULT_MIX, display_path
from .errors import TokenizerError
from .evaluate import BASELINES, evaluate, load_encoders, markdown_report, save_report
from .tokenizer import SHIPPED_TOKENIZER
from .train import (
    DEFAULT_CHARACTER_COVERAGE,
    DEFAULT_MODEL_TYPE,
    DEFAULT_VOCAB_SIZE,
    MAX_VOCAB_SIZE,
    MODEL_TYPES,
    train_tokenizer,
)


def add_commands(subparsers) -> None:
    """Add the `tokenizer` command, with sub-commands `train` and `eval`, to the main CLI's subparsers."""
    tokenizer = subparsers.add_parser(
        "tokenizer",
        help="train and evaluate the Korean-first tokenizer",
        description="Train and evaluate kmodel tokenizers.",
    )
    commands = tokenizer.add_subparsers(dest="tokenizer_command", metavar="{train,eval}", required=True)

    train = commands.add_parser(
        "train",
        help="train a SentencePiece tokenizer on a language-weighted corpus sample",
        description="Train a SentencePiece tokenizer (NFC, byte fallback, split digits, whitespace kept, special "
        "tokens registered) and write tokenizer.model, tokenizer.json and metadata.json to --out.",
    )
    train.add_argument(
        "--out", required=True, metavar="DIR", help="directory to write the tokenizer into (created if missing)"
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        metavar="N",
        help=f"vocabulary size including special and byte pieces, up to {MAX_VOCAB_SIZE} "
        f"(default {DEFAULT_VOCAB_SIZE}); an error says so when the corpus cannot fill it",
    )
    train.add_argument(
        "--mix",
        default=DEFAULT_MIX,
        metavar="LANG=W,...",
        help=f"share of training characters per document language, the 'lang' field of the input "
        f"(default {DEFAULT_MIX}); languages left out are not used",
    )
    train.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help="training files: .jsonl with 'text' and 'lang' per line, or plain UTF-8 text (language "
        "'text'); default: the bundled train split data/corpus/train/*.jsonl",
    )
    train.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default=DEFAULT_MODEL_TYPE,
        help=f"SentencePiece algorithm (default {DEFAULT_MODEL_TYPE}, chosen by measurement; see docs/tokenizer.md)",
    )
    train.add_argument(
        "--character-coverage",
        type=float,
        default=DEFAULT_CHARACTER_COVERAGE,
        metavar="F",
        help=f"share of training characters the base alphabet must cover; rarer characters are "
        f"byte-encoded (default {DEFAULT_CHARACTER_COVERAGE})",
    )
    train.add_argument(
        "--morpheme-aware",
        action="store_true",
        help="learn the vocabulary with Korean morpheme boundaries from the Kiwi analyser (kiwipiepy); "
        "measured worse than the plain setting, so off by default",
    )
    train.add_argument(
        "--max-chars",
        type=int,
        metavar="N",
        help="cap on the characters sampled for training (default: all the mix allows)",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the document sampling (default 0)")
    train.add_argument("--threads", type=int, metavar="N", help="SentencePiece trainer threads (default: all cores)")
    train.add_argument(
        "--skip-invalid-lines",
        action="store_true",
        help="skip malformed JSON lines (each is reported and recorded in metadata.json) instead of failing",
    )
    train.set_defaults(func=run_train)

    evaluation = commands.add_parser(
        "eval",
        help="measure compression and coverage on held-out text, against baselines",
        description="Report characters/token, bytes/token, tokens/word, byte-fallback rate and unused vocabulary "
        "share per file and language, for the tokenizer and the chosen baselines side by side.",
    )
    evaluation.add_argument(
        "tokenizer",
        metavar="TOKENIZER",
        help="tokenizer directory (metadata.json + model), or 'shipped' for the bundled ko-8k tokenizer",
    )
    evaluation.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="held-out text: .jsonl with 'text' and 'lang' per line, or plain UTF-8 text",
    )
    evaluation.add_argument(
        "--against",
        default="",
        metavar="NAME,...",
        help=f"comma-separated baselines to compare with, from {','.join(BASELINES)}, or 'all' "
        "(default: none); a baseline that cannot be loaded offline is skipped with a warning",
    )
    evaluation.add_argument("--json", action="store_true", help="print the report as JSON instead of markdown tables")
    evaluation.add_argument("--save", metavar="PREFIX", help="also write the report to PREFIX.md and PREFIX.json")
    evaluation.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    try:
        tok = train_tokenizer(
            args.out,
            vocab_size=args.vocab_size,
            mix=args.mix,
            inputs=args.input,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            morpheme_aware=args.morpheme_aware,
            max_characters=args.max_chars,
            seed=args.seed,
            num_threads=args.threads,
            skip_invalid_lines=args.skip_invalid_lines,
        )
    except (TokenizerError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sample = tok.metadata["corpus"]["sample"]["characters_by_lang"]
    print(f"trained {tok.model_type} tokenizer, vocab_size {tok.vocab_size}, in {tok.metadata['training_seconds']} s")
    print(f"  sample: {', '.join(f'{lang} {chars:,} chars' for lang, chars in sample.items())}")
    print(f"  written to {display_path(tok.directory)} (sha256 {tok.fingerprint()})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    against = (
        list(BASELINES) if args.against == "all" else [name.strip() for name in args.against.split(",") if name.strip()]
    )
    path = SHIPPED_TOKENIZER if args.tokenizer == "shipped" else args.tokenizer
    try:
        encoders, skipped = load_encoders(path, against)
        report = evaluate(encoders, args.files)
    except (TokenizerError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report["skipped_baselines"] = skipped
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else markdown_report(report))
    if args.save:
        for written in save_report(report, args.save):
            print(f"saved {written}", file=sys.stderr)
    return 0
