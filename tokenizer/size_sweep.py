"""Choosing the production vocabulary size and mix on a built corpus.

    python -P -m kmodel.tokenizer.size_sweep --corpus DIR --mix ko=0.5,en=0.25,code=0.25 \
        --sizes 65536,98304,131072,163840 --out bench/results/tokenizer_size_sweep

BPE merges are learned greedily, so the merges of a smaller vocabulary are a prefix of a larger one's: one
Hugging Face run at the largest size gives every size. Each size is scored on the corpus's held-out files
(characters per token) next to o200k, grouped as Korean from domains seen in training, Korean from the unseen
domains (from `manifest.json`), English and code. Several --mix values may be given, separated by `;`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece

from . import special_tokens
from .corpus import parse_mix
from .corpus_build import MANIFEST_FILE
from .evaluate import load_baseline
from .stream_train import (
    alphabet_for_coverage,
    learn_hf_merges,
    sample_corpus,
    sentencepiece_bpe_model,
)
from .train import DEFAULT_CHARACTER_COVERAGE


def heldout_groups(corpus: Path) -> dict[str, list[Path]]:
    """Held-out files grouped as ko_seen, ko_unseen, en_seen, en_unseen, code_seen, code_unseen."""
    manifest = json.loads((corpus / MANIFEST_FILE).read_text(encoding="utf-8"))
    groups: dict[str, list[Path]] = {}
    for source in manifest["sources"]:
        path = corpus / "heldout" / f"{source['name']}.jsonl"
        if path.exists():
            groups.setdefault(f"{source['lang']}_{'unseen' if source['unseen'] else 'seen'}", []).append(path)
    return dict(sorted(groups.items()))


def read_texts(paths: list[Path], max_chars: int) -> list[str]:
    """The first documents of each file, up to `max_chars` characters per file (keeps scoring cheap)."""
    texts = []
    for path in paths:
        taken = 0
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if taken >= max_chars:
                    break
                text = json.loads(line)["text"]
                texts.append(text)
                taken += len(text)
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="a corpus built by `kmodel tokenizer build-corpus`")
    parser.add_argument("--mix", default="ko=0.5,en=0.25,code=0.25", help="one or more mixes, separated by ';'")
    parser.add_argument("--sizes", default="65536,98304,131072,163840")
    parser.add_argument("--sample-chars", type=int, default=60_000_000)
    parser.add_argument("--score-chars", type=int, default=300_000, help="held-out characters scored per file")
    parser.add_argument("--out", type=Path, required=True, help="PREFIX for .md and .json")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "2")

    sizes = sorted(int(size) for size in args.sizes.split(","))
    groups = {name: read_texts(paths, args.score_chars) for name, paths in heldout_groups(args.corpus).items()}
    o200k = load_baseline("o200k")
    reference = {name: sum(map(len, texts)) / sum(len(o200k.encode(t)) for t in texts) for name, texts in groups.items()}
    train_files = sorted((args.corpus / "train").glob("*.jsonl"))
    rows = []
    for mix_spec in args.mix.split(";"):
        mix = parse_mix(mix_spec)
        started = time.perf_counter()
        texts, record = sample_corpus(train_files, mix, args.sample_chars, seed=0, upsample=True)
        alphabet = alphabet_for_coverage(texts, DEFAULT_CHARACTER_COVERAGE)
        reserved = len(special_tokens.ALL) + 256
        merges = learn_hf_merges(texts, sizes[-1] - reserved - len(alphabet), alphabet)
        seconds = time.perf_counter() - started
        del texts
        for size in sizes:
            processor = sentencepiece.SentencePieceProcessor()
            processor.LoadFromSerializedProto(sentencepiece_bpe_model(merges, alphabet, size))
            scores = {
                name: sum(map(len, texts)) / sum(len(ids) for ids in processor.Encode(texts))
                for name, texts in groups.items()
            }
            row = {"mix": mix_spec, "vocab_size": size, "learning_seconds_at_max": round(seconds, 1),
                   "repeats_by_lang": record["sample"]["repeats_by_lang"],
                   "chars_per_token": scores, "vs_o200k": {k: v / reference[k] for k, v in scores.items()}}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    names = list(groups)
    summary = (
        f"Corpus {args.corpus.name}, HF BPE learner, sample {args.sample_chars:,} characters (upsampled to the mix), "
        f"scored on up to {args.score_chars:,} held-out characters per file. Load: `{load}`."
    )
    lines = [
        summary,
        "",
        "| mix | vocab | " + " | ".join(f"{n} c/t (x o200k)" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    lines.append("| o200k | 200,019 | " + " | ".join(f"{reference[n]:.3f}" for n in names) + " |")
    for row in rows:
        cells = [f"{row['chars_per_token'][n]:.3f} ({row['vs_o200k'][n]:.2f}x)" for n in names]
        lines.append(f"| {row['mix']} | {row['vocab_size']:,} | " + " | ".join(cells) + " |")
    report = {"corpus": args.corpus.name, "load": load, "o200k": reference, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
