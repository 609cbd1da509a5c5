"""The measurement behind the training defaults: BPE vs unigram, character coverage, morpheme-aware training
and vocabulary size, each trained on the train split and scored on the held-out split.

    python -m kmodel.tokenizer.sweep --out bench/results/tokenizer_sweep

Score: tokens per 1,000 characters of held-out text under the training mix (each language's tokens/char
weighted by its --mix share); lower is better. Prints a markdown table and saves PREFIX.md and PREFIX.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .corpus import BUNDLED_HELDOUT_DIR, DEFAULT_MIX, parse_mix
from .evaluate import evaluate, kmodel_encoder
from .train import DEFAULT_VOCAB_SIZE, MODEL_TYPES, train_tokenizer

COVERAGES = (0.999, 0.9995, 0.9999, 1.0)
VOCAB_SIZES = (8192, 16384, 32768, 49152)


def measure(
    workdir: Path, heldout: list[Path], mix: dict[str, float], skip_invalid_lines: bool, **settings
) -> dict:
    """Train one tokenizer with `settings` and score it on `heldout`."""
    name = "-".join(f"{key}={value}" for key, value in settings.items())
    tok = train_tokenizer(workdir / name, mix=mix, skip_invalid_lines=skip_invalid_lines, **settings)
    report = evaluate([kmodel_encoder(tok)], heldout)
    per_lang = {row["lang"]: row for row in report["rows"]}
    missing = [lang for lang in mix if lang not in per_lang]
    if missing:
        raise SystemExit(f"held-out files have no documents for language(s) {', '.join(missing)} of the mix")
    return {
        **{key: settings.get(key) for key in ("model_type", "character_coverage", "morpheme_aware", "vocab_size")},
        "tokens_per_1k_chars": sum(1000 * weight / per_lang[lang]["chars_per_token"] for lang, weight in mix.items()),
        "chars_per_token": {lang: per_lang[lang]["chars_per_token"] for lang in mix},
        "byte_fallback_rate": {lang: per_lang[lang]["byte_fallback_rate"] for lang in mix},
        "training_seconds": tok.metadata["training_seconds"],
    }


def sweep(heldout: list[Path], mix: dict[str, float], vocab_sizes: tuple[int, ...], skip_invalid_lines: bool) -> dict:
    results: dict[str, list[dict]] = {"model_and_coverage": [], "morpheme_aware": [], "vocab_size": []}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)

        def run(section: str, **settings) -> dict:
            result = measure(workdir, heldout, mix, skip_invalid_lines, **settings)
            results[section].append(result)
            print(f"  {section}: {settings} -> {result['tokens_per_1k_chars']:.1f} tokens/1k chars", file=sys.stderr)
            return result

        best_by_type = {}
        for model_type in MODEL_TYPES:
            for coverage in COVERAGES:
                result = run("model_and_coverage", model_type=model_type, character_coverage=coverage,
                             morpheme_aware=False, vocab_size=DEFAULT_VOCAB_SIZE)
                if model_type not in best_by_type or result["tokens_per_1k_chars"] < best_by_type[model_type]["tokens_per_1k_chars"]:
                    best_by_type[model_type] = result
        for model_type, best in best_by_type.items():
            run("morpheme_aware", model_type=model_type, character_coverage=best["character_coverage"],
                morpheme_aware=True, vocab_size=DEFAULT_VOCAB_SIZE)
        best = min(best_by_type.values(), key=lambda result: result["tokens_per_1k_chars"])
        for vocab_size in vocab_sizes:
            try:
                run("vocab_size", model_type=best["model_type"], character_coverage=best["character_coverage"],
                    morpheme_aware=False, vocab_size=vocab_size)
            except ValueError as error:  # the corpus cannot fill this vocabulary: record it, keep going
                results["vocab_size"].append({"vocab_size": vocab_size, "error": str(error)})
    return {"mix": mix, "heldout": [str(path) for path in heldout], "best": best, **results}


def markdown(report: dict) -> str:
    langs = list(report["mix"])
    header = ["model", "coverage", "morpheme-aware", "vocab", "tokens/1k chars (mix)"]
    header += [f"{lang} chars/token" for lang in langs] + [f"{lang} byte fallback" for lang in langs] + ["train s"]
    lines = []
    for section in ("model_and_coverage", "morpheme_aware", "vocab_size"):
        lines += [f"### {section.replace('_', ' ')}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in report[section]:
            if "error" in row:
                lines.append(f"| | | | {row['vocab_size']:,} | not trainable: {row['error']} |")
                continue
            cells = [row["model_type"], f"{row['character_coverage']}", "yes" if row["morpheme_aware"] else "no",
                     f"{row['vocab_size']:,}", f"{row['tokens_per_1k_chars']:.1f}"]
            cells += [f"{row['chars_per_token'][lang]:.3f}" for lang in langs]
            cells += [f"{100 * row['byte_fallback_rate'][lang]:.2f}%" for lang in langs]
            cells.append(f"{row['training_seconds']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    best = report["best"]
    lines.append(f"Best at {DEFAULT_VOCAB_SIZE}: {best['model_type']}, character coverage {best['character_coverage']} "
                 f"({best['tokens_per_1k_chars']:.1f} tokens per 1k chars under the mix).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kmodel.tokenizer.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/tokenizer_sweep", help="output prefix: writes PREFIX.md and PREFIX.json")
    parser.add_argument("--heldout", nargs="+", type=Path, default=sorted(BUNDLED_HELDOUT_DIR.glob("*.jsonl")),
                        help="held-out .jsonl files to score on (default: data/corpus/heldout/*.jsonl)")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"training mix and score weights (default {DEFAULT_MIX})")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=list(VOCAB_SIZES),
                        help="vocabulary sizes to try with the best setting")
    parser.add_argument("--skip-invalid-lines", action="store_true", help="skip malformed JSON lines in the train split")
    args = parser.parse_args(argv)
    report = sweep(args.heldout, parse_mix(args.mix), tuple(args.vocab_sizes), args.skip_invalid_lines)
    text = markdown(report)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text, encoding="utf-8")
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
