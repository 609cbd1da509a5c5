"""`kmodel tokenizer train` and `kmodel tokenizer eval`; the main CLI calls `add_commands(subparsers)`."""

from __future__ import annotations

import argparse
import json
import sys

from .corpus import DEFAULT_MIX, display_path
from .corpus_build import (
    MANIFEST_FILE,
    SOURCES_BY_NAME,
    build_corpus,
    synthesize_corpus,
    write_heldout_samples,
)
from .errors import TokenizerError
from .evaluate import (
    BASELINES,
    evaluate,
    load_encoders,
    markdown_report,
    measured,
    save_report,
)
from .stream_train import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_SAMPLE_CHARS,
    train_streaming,
)
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
    commands = tokenizer.add_subparsers(
        dest="tokenizer_command", metavar="{build-corpus,synthesize-corpus,train,eval}", required=True
    )

    build = commands.add_parser(
        "build-corpus",
        help="build the Korean/English/code corpus offline from Debian packages",
        description="Extract text from Debian packages (help manuals, gettext catalogues, language packs, "
        "documentation, source code), NFC-normalise and deduplicate it, and write OUT/train/*.jsonl, "
        "OUT/heldout/*.jsonl (one tenth of each source's documents, all of an unseen domain's) and "
        "OUT/manifest.json (packages, sha256, licence, counts per source).",
    )
    build.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    build.add_argument(
        "--debs", required=True, metavar="DIR", help="directory holding the .deb files (the download cache)"
    )
    build.add_argument(
        "--download", action="store_true", help="fetch missing packages with `apt-get download` into --debs"
    )
    build.add_argument(
        "--source", nargs="+", metavar="NAME", help=f"only these sources (default all: {', '.join(SOURCES_BY_NAME)})"
    )
    build.add_argument(
        "--heldout-sample",
        metavar="DIR",
        help="also copy the first held-out documents of each source into DIR (small enough to commit)",
    )
    build.add_argument(
        "--heldout-sample-chars",
        type=int,
        default=100_000,
        metavar="N",
        help="characters per source in --heldout-sample (default 100,000)",
    )
    build.set_defaults(func=run_build_corpus)

    synthesize = commands.add_parser(
        "synthesize-corpus",
        help="write a corpus of a given size from the built training documents, for measuring training at scale",
        description="Repeat the training documents of a built corpus, in a fresh seeded order per pass and with "
        "their lines shuffled after the first, until --bytes are written (JSON Lines).",
    )
    synthesize.add_argument("--train", required=True, metavar="DIR", help="the train/ directory of a built corpus")
    synthesize.add_argument("--out", required=True, metavar="FILE", help="the .jsonl file to write")
    synthesize.add_argument("--bytes", type=int, default=1_000_000_000, help="target size (default 1e9)")
    synthesize.add_argument("--seed", type=int, default=0, help="seed of the document order (default 0)")
    synthesize.set_defaults(func=run_synthesize_corpus)

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
        f"(default {DEFAULT_MIX}); languages left out are not used. With --stream an entry may also name a "
        f"source (the 'source' field up to its ':'), which then gets its own share apart from its language "
        f"(0 leaves it out)",
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
    train.add_argument(
        "--stream",
        action="store_true",
        help="read the input line by line and train on a seeded sample of --sample-chars characters (never "
        "the whole corpus in memory), with the learner of --backend; BPE only, no --morpheme-aware/--max-chars",
    )
    train.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help=f"with --stream: the BPE learner (default {DEFAULT_BACKEND}, chosen by measurement; see "
        "docs/tokenizer.md). Both produce the same SentencePiece-format tokenizer",
    )
    train.add_argument(
        "--sample-chars",
        type=int,
        default=DEFAULT_SAMPLE_CHARS,
        metavar="N",
        help=f"with --stream: characters in the training sample (default {DEFAULT_SAMPLE_CHARS:,})",
    )
    train.add_argument(
        "--upsample",
        action="store_true",
        help="with --stream: give every language its --mix share of --sample-chars, repeating a language "
        "that has less text (default: the scarcest language sets the total)",
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


def run_build_corpus(args: argparse.Namespace) -> int:
    try:
        build_corpus(args.out, debs_dir=args.debs, download=args.download, sources=args.source)
        if args.heldout_sample:
            write_heldout_samples(args.out, args.heldout_sample, args.heldout_sample_chars)
    except TokenizerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"corpus written to {args.out} (manifest: {args.out}/{MANIFEST_FILE})")
    return 0


def run_synthesize_corpus(args: argparse.Namespace) -> int:
    try:
        record = synthesize_corpus(args.train, args.out, args.bytes, seed=args.seed)
    except TokenizerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {record['bytes']:,} bytes, {record['documents']:,} documents ({record['passes']} passes) to {args.out}")
    return 0


def _train(args: argparse.Namespace):
    if args.stream:
        if args.input is None:
            raise TokenizerError("--stream needs --input (the .jsonl files of a built corpus)")
        if args.model_type != "bpe" or args.morpheme_aware or args.max_chars is not None:
            raise TokenizerError("--stream trains BPE only; drop --model-type/--morpheme-aware/--max-chars")
        return train_streaming(
            args.out,
            args.input,
            vocab_size=args.vocab_size,
            mix=args.mix,
            backend=args.backend,
            sample_chars=args.sample_chars,
            character_coverage=args.character_coverage,
            seed=args.seed,
            num_threads=args.threads,
            upsample=args.upsample,
        )
    return train_tokenizer(
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


def run_train(args: argparse.Namespace) -> int:
    try:
        tok = _train(args)
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
        report = measured(lambda: evaluate(encoders, args.files))
    except (TokenizerError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report["skipped_baselines"] = skipped
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else markdown_report(report))
    if args.save:
        for written in save_report(report, args.save):
            print(f"saved {written}", file=sys.stderr)
    return 0
