"""Compression and coverage of a tokenizer on held-out text, side by side with public baselines.

Per file and language (and per language over all files) it reports:

- chars/token and bytes/token (UTF-8): higher means shorter sequences;
- tokens/word: tokens per whitespace-separated word (an eojeol, for Korean);
- byte fallback: share of tokens that are not whole characters. For kmodel tokenizers these are the
  <0xNN> byte pieces; for byte-level BPE baselines, tokens whose bytes are not valid UTF-8 on their own
  (fragments of a character);
- vocab unused: share of the vocabulary that the text never uses.

Baselines, all offline: o200k (GPT-4o), cl100k (GPT-4), llama3 and qwen3 from the `quicktok-v1` package, and
Tekken (Mistral NeMo) from `mistral-common`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import display_path, read_corpus_file
from .errors import TokenizerError
from .tokenizer import Tokenizer

ALL_FILES = "(all files)"


@dataclass
class Encoder:
    """What evaluation needs from a tokenizer."""

    name: str
    vocab_size: int
    encode: Callable[[str], list[int]]
    is_byte_fallback: Callable[[int], bool]
    fingerprint: str | None = None  # sha256 of a kmodel tokenizer's model, for the record


def kmodel_encoder(tok: Tokenizer, name: str | None = None) -> Encoder:
    return Encoder(name or f"kmodel:{tok.directory.name}", tok.vocab_size, tok.encode, tok.is_byte, tok.fingerprint())


def _fragment_checker(token_bytes: Callable[[int], bytes]) -> Callable[[int], bool]:
    """For byte-level BPE: a token is a byte-fallback fragment when its bytes are not valid UTF-8 alone."""
    cache: dict[int, bool] = {}

    def is_fragment(index: int) -> bool:
        if index not in cache:
            try:
                token_bytes(index).decode("utf-8")
                cache[index] = False
            except UnicodeDecodeError:
                cache[index] = True
        return cache[index]

    return is_fragment


_QUICKTOK_ENCODINGS = {"o200k": "o200k_base", "cl100k": "cl100k_base", "llama3": "llama3", "qwen3": "qwen3"}
BASELINES = (*_QUICKTOK_ENCODINGS, "tekken")


def load_baseline(name: str) -> Encoder:
    """Load a baseline by name; raises TokenizerError (unknown name) or ImportError/OSError (not installed)."""
    if name in _QUICKTOK_ENCODINGS:
        import quicktok

        encoding = quicktok.get_encoding(_QUICKTOK_ENCODINGS[name])
        return Encoder(
            name, encoding.n_vocab, encoding.encode_ordinary, _fragment_checker(encoding.decode_single_token_bytes)
        )
    if name == "tekken":
        import mistral_common
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        # The Tekken vocabulary of Mistral NeMo, bundled inside mistral-common (no download).
        path = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
        tekken = Tekkenizer.from_file(path)
        return Encoder(
            name,
            tekken.n_words,
            lambda text: tekken.encode(text, bos=False, eos=False),
            _fragment_checker(tekken.id_to_byte_piece),
        )
    raise TokenizerError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


@dataclass
class Tally:
    documents: int = 0
    characters: int = 0
    bytes: int = 0
    words: int = 0
    tokens: int = 0
    byte_fallback_tokens: int = 0
    ids_used: set[int] = field(default_factory=set)

    def add(self, text: str, ids: list[int], is_byte_fallback: Callable[[int], bool]) -> None:
        self.documents += 1
        self.characters += len(text)
        self.bytes += len(text.encode("utf-8"))
        self.words += len(text.split())
        self.tokens += len(ids)
        self.byte_fallback_tokens += sum(1 for index in ids if is_byte_fallback(index))
        self.ids_used.update(ids)

    def merge(self, other: Tally) -> None:
        for name in ("documents", "characters", "bytes", "words", "tokens", "byte_fallback_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.ids_used |= other.ids_used

    def metrics(self, vocab_size: int) -> dict:
        tokens = max(self.tokens, 1)
        return {
            "documents": self.documents,
            "characters": self.characters,
            "bytes": self.bytes,
            "words": self.words,
            "tokens": self.tokens,
            "chars_per_token": self.characters / tokens,
            "bytes_per_token": self.bytes / tokens,
            "tokens_per_word": self.tokens / max(self.words, 1),
            "byte_fallback_rate": self.byte_fallback_tokens / tokens,
            "vocab_unused_share": 1 - len(self.ids_used) / vocab_size,
        }


def _row(file: str, lang: str, encoder: Encoder, tally: Tally) -> dict:
    return {"file": file, "lang": lang, "tokenizer": encoder.name, **tally.metrics(encoder.vocab_size)}


def evaluate(encoders: list[Encoder], files: Iterable[str | Path]) -> dict:
    """Measure every encoder on every file. Returns {"tokenizers": [...], "rows": [...]}: one row per
    (file, language, tokenizer), plus one over all files for a language found in several files."""
    corpus = [read_corpus_file(path) for path in files]
    for corpus_file in corpus:
        if not corpus_file.documents:
            raise TokenizerError(f"evaluation file {corpus_file.path} has no non-empty documents")
    rows = []
    for encoder in encoders:
        totals: dict[str, Tally] = {}
        files_per_lang: dict[str, int] = {}
        for corpus_file in corpus:
            per_lang: dict[str, Tally] = {}
            for document in corpus_file.documents:
                tally = per_lang.setdefault(document.lang, Tally())
                tally.add(document.text, encoder.encode(document.text), encoder.is_byte_fallback)
            for lang, tally in sorted(per_lang.items()):
                rows.append(_row(display_path(corpus_file.path), lang, encoder, tally))
                totals.setdefault(lang, Tally()).merge(tally)
                files_per_lang[lang] = files_per_lang.get(lang, 0) + 1
        for lang, tally in sorted(totals.items()):
            if files_per_lang[lang] > 1:
                rows.append(_row(ALL_FILES, lang, encoder, tally))
    return {
        "tokenizers": [{"name": e.name, "vocab_size": e.vocab_size, "sha256": e.fingerprint} for e in encoders],
        "files": [{"path": display_path(f.path), "sha256": f.sha256} for f in corpus],
        "rows": rows,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured(report_of: Callable[[], dict]) -> dict:
    """Run `report_of` and add where it ran: the CPU, its cores, the 1-minute load average before and after
    (the machine is shared; compression does not depend on it, the wall time does) and the wall time."""
    load_before, started = os.getloadavg()[0], time.perf_counter()
    report = report_of()
    report["machine"] = {
        "device": f"{_cpu_name()}, {os.cpu_count()} cores (CPU only)",
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return report


def load_encoders(tokenizer_path: str | Path, against: Iterable[str]) -> tuple[list[Encoder], dict[str, str]]:
    """The kmodel tokenizer plus the baselines that load; returns (encoders, {skipped baseline: reason})."""
    encoders = [kmodel_encoder(Tokenizer.load(tokenizer_path))]
    skipped: dict[str, str] = {}
    for name in against:
        if name not in BASELINES:
            raise TokenizerError(f"--against: unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
        try:
            encoders.append(load_baseline(name))
        except (ImportError, OSError, RuntimeError) as error:
            skipped[name] = f"{type(error).__name__}: {error}"
            print(
                f"warning: baseline {name} skipped, it could not be loaded offline ({skipped[name]})", file=sys.stderr
            )
    return encoders, skipped


def _group_key(row: dict) -> tuple[str, str]:
    return row["file"], row["lang"]


def markdown_report(report: dict) -> str:
    """Two tables: chars/token side by side per file and language, then every metric per tokenizer."""
    names = [t["name"] for t in report["tokenizers"]]
    ours = names[0]
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for row in report["rows"]:
        groups.setdefault(_group_key(row), {})[row["tokenizer"]] = row
    compare_with = "o200k" if "o200k" in names else None

    lines = ["### Characters per token (higher is better)", ""]
    header = ["file", "lang", "chars", *names] + ([f"{ours} / o200k"] if compare_with else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (file, lang), by_name in groups.items():
        cells = [file, lang, f"{by_name[ours]['characters']:,}"]
        cells += [f"{by_name[name]['chars_per_token']:.3f}" for name in names]
        if compare_with:
            cells.append(f"{by_name[ours]['chars_per_token'] / by_name[compare_with]['chars_per_token']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "### All metrics", ""]
    header = [
        "file",
        "lang",
        "tokenizer",
        "vocab",
        "tokens",
        "chars/token",
        "bytes/token",
        "tokens/word",
        "byte fallback",
        "vocab unused",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    vocab = {t["name"]: t["vocab_size"] for t in report["tokenizers"]}
    for (file, lang), by_name in groups.items():
        for name in names:
            row = by_name[name]
            lines.append(
                f"| {file} | {lang} | {name} | {vocab[name]:,} | {row['tokens']:,} | {row['chars_per_token']:.3f} | "
                f"{row['bytes_per_token']:.3f} | {row['tokens_per_word']:.3f} | {100 * row['byte_fallback_rate']:.2f}% | "
                f"{100 * row['vocab_unused_share']:.1f}% |"
            )
    lines.append("")
    for tokenizer in report["tokenizers"]:
        if tokenizer["sha256"]:
            lines.append(f"{tokenizer['name']}: model sha256 {tokenizer['sha256']}")
    lines += [f"{f['path']}: sha256 {f['sha256']}" for f in report["files"]]
    lines += [f"Baseline {name} skipped: {reason}" for name, reason in report.get("skipped_baselines", {}).items()]
    if "machine" in report:
        machine = report["machine"]
        lines.append(
            f"Measured on {machine['device']}, load average {machine['load_average'][0]} before and "
            f"{machine['load_average'][1]} after, {machine['wall_seconds']} s"
        )
    return "\n".join(lines) + "\n"


def save_report(report: dict, prefix: str | Path) -> tuple[Path, Path]:
    """Write PREFIX.md and PREFIX.json."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    markdown, data = Path(f"{prefix}.md"), Path(f"{prefix}.json")
    markdown.write_text(markdown_report(report), encoding="utf-8")
    data.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return markdown, data
