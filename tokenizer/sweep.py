"""The measurement behind the training defaults: BPE vs unigram, character coverage, morpheme-aware training
and vocabulary size, each trained on the bundled train split and scored on the held-out split.

    python -P -m kmodel.tokenizer.sweep --out bench/results/tokenizer_sweep

Score: tokens per 1,000 characters of held-out text under the training mix (each language's tokens/char
weighted by its --mix share); lower is better. Prints a markdown table and saves PREFIX.md and PREFIX.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .corpus import BUNDLED_HELDOUT_DIR, DEFAULT_MIX, display_path, parse_mix
from .errors import TokenizerError
from .evaluate import evaluate, kmodel_encoder
from .train import DEFAULT_VOCAB_SIZE, MODEL_TYPES, train_tokenizer

COVERAGES = (0.999, 0.9995, 0.9999, 1.0)
VOCAB_SIZES = (8192, 16384, 32768, 49152, 65536)
SETTINGS = ("model_type", "character_coverage", "morpheme_aware", "vocab_size")
SECTIONS = ("model_and_coverage", "morpheme_aware", "vocab_size")


class Sweep:
    def __init__(self, workdir: Path, heldout: list[Path], mix: dict[str, float]):
        self.workdir, self.heldout, self.mix = workdir, heldout, mix
        self.results: dict[str, list[dict]] = {section: [] for section in SECTIONS}
        self.train_files: list[dict] = []

    def run(self, section: str, **settings) -> dict:
        """Train one tokenizer with `settings`, score it on the held-out files and record the result."""
        name = "-".join(f"{key}={value}" for key, value in settings.items())
        try:
            tok = train_tokenizer(self.workdir / name, mix=self.mix, **settings)
        except TokenizerError as error:  # e.g. a vocabulary the corpus cannot fill: record it, keep going
            result = {**settings, "error": str(error)}
            self.results[section].append(result)
            return result
        self.train_files = tok.metadata["corpus"]["files"]
        per_lang = {row["lang"]: row for row in evaluate([kmodel_encoder(tok)], self.heldout)["rows"]}
        missing = [lang for lang in self.mix if lang not in per_lang]
        if missing:
            raise TokenizerError(f"the held-out files have no documents in mix language(s) {', '.join(missing)}")
        result = {
            **settings,
            "tokens_per_1k_chars": sum(1000 * w / per_lang[lang]["chars_per_token"] for lang, w in self.mix.items()),
            "chars_per_token": {lang: per_lang[lang]["chars_per_token"] for lang in self.mix},
            "byte_fallback_rate": {lang: per_lang[lang]["byte_fallback_rate"] for lang in self.mix},
            "training_seconds": tok.metadata["training_seconds"],
        }
        self.results[section].append(result)
        print(f"  {name}: {result['tokens_per_1k_chars']:.1f} tokens per 1k chars", file=sys.stderr)
        return result


def sweep(heldout: list[Path], mix: dict[str, float], vocab_sizes: tuple[int, ...]) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        runs = Sweep(Path(scratch), heldout, mix)
        plain = {"morpheme_aware": False, "vocab_size": DEFAULT_VOCAB_SIZE}
        best_by_type = {}
        for model_type in MODEL_TYPES:
            results = [
                runs.run("model_and_coverage", model_type=model_type, character_coverage=coverage, **plain)
                for coverage in COVERAGES
            ]
            best_by_type[model_type] = min(results, key=lambda result: result["tokens_per_1k_chars"])
        for model_type, best in best_by_type.items():
            runs.run(
                "morpheme_aware",
                model_type=model_type,
                character_coverage=best["character_coverage"],
                morpheme_aware=True,
                vocab_size=DEFAULT_VOCAB_SIZE,
            )
        best = min(best_by_type.values(), key=lambda result: result["tokens_per_1k_chars"])
        for vocab_size in vocab_sizes:
            runs.run(
                "vocab_size",
                model_type=best["model_type"],
                character_coverage=best["character_coverage"],
                morpheme_aware=False,
                vocab_size=vocab_size,
            )
    return {
        "mix": mix,
        "train_files": runs.train_files,
        "heldout": [display_path(path) for path in heldout],
        "best": best,
        **runs.results,
    }


def markdown(report: dict) -> str:
    langs = list(report["mix"])
    header = ["model", "coverage", "morpheme-aware", "vocab", "tokens/1k chars (mix)"]
    header += [f"{lang} chars/token" for lang in langs] + [f"{lang} byte fallback" for lang in langs] + ["train s"]
    lines = []
    for section in SECTIONS:
        lines += [f"### {section.replace('_', ' ')}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in report[section]:
            cells = [
                row["model_type"],
                f"{row['character_coverage']}",
                "yes" if row["morpheme_aware"] else "no",
                f"{row['vocab_size']:,}",
            ]
            if "error" in row:
                lines.append("| " + " | ".join(cells) + f" | not trainable: {row['error']} |")
                continue
            cells.append(f"{row['tokens_per_1k_chars']:.1f}")
            cells += [f"{row['chars_per_token'][lang]:.3f}" for lang in langs]
            cells += [f"{100 * row['byte_fallback_rate'][lang]:.2f}%" for lang in langs]
            cells.append(f"{row['training_seconds']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    best = report["best"]
    lines.append(
        f"Best at {DEFAULT_VOCAB_SIZE}: {best['model_type']}, character coverage {best['character_coverage']} "
        f"({best['tokens_per_1k_chars']:.1f} tokens per 1k chars under the mix {report['mix']})."
    )
    lines.append(f"Held-out: {', '.join(report['heldout'])}.")
    lines += [f"Train file {f['path']}: sha256 {f['sha256']}" for f in report["train_files"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -P -m kmodel.tokenizer.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default="bench/results/tokenizer_sweep", help="output prefix: writes PREFIX.md and PREFIX.json"
    )
    parser.add_argument(
        "--heldout",
        nargs="+",
        type=Path,
        default=sorted(BUNDLED_HELDOUT_DIR.glob("*.jsonl")),
        help="held-out .jsonl files to score on (default: data/corpus/heldout/*.jsonl)",
    )
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"training mix and score weights (default {DEFAULT_MIX})")
    parser.add_argument(
        "--vocab-sizes",
        type=int,
        nargs="+",
        default=list(VOCAB_SIZES),
        help="vocabulary sizes to try with the best 8k setting (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    report = sweep(args.heldout, parse_mix(args.mix), tuple(args.vocab_sizes))
    text = markdown(report)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text, encoding="utf-8")
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
