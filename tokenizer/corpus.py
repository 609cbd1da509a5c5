"""Reading corpus files and drawing the language-weighted training sample.

A corpus file is either JSON Lines (one `{"text", "lang", ...}` object a line, the format of
`data/corpus/`) or any other UTF-8 file, read as one document of language `text`. All text is NFC-normalised
on the way in, because the tokenizer normalises to NFC before encoding.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TokenizerError

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_TRAIN_DIR = REPO_ROOT / "data" / "corpus" / "train"
BUNDLED_HELDOUT_DIR = REPO_ROOT / "data" / "corpus" / "heldout"
DEFAULT_MIX = "ko=0.6,en=0.25,code=0.15"
PLAIN_TEXT_LANG = "text"


@dataclass(frozen=True)
class Document:
    text: str
    lang: str
    origin: str  # "file:line", for messages


@dataclass
class CorpusFile:
    path: Path
    sha256: str
    documents: list[Document]
    skipped_lines: list[dict] = field(default_factory=list)  # {"line", "reason"}, only with skip_invalid_lines

    def describe(self) -> dict:
        """The provenance record stored in tokenizer metadata."""
        return {
            "path": display_path(self.path),
            "sha256": self.sha256,
            "documents": len(self.documents),
            "characters": sum(len(d.text) for d in self.documents),
            "skipped_lines": list(self.skipped_lines),
        }


def display_path(path: Path) -> str:
    """The path relative to the repository when it lies inside it, so metadata does not leak machine paths."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def default_training_files() -> list[Path]:
    files = sorted(BUNDLED_TRAIN_DIR.glob("*.jsonl"))
    if not files:
        raise TokenizerError(f"no bundled training corpus: {BUNDLED_TRAIN_DIR} has no *.jsonl files; pass --input")
    return files


def read_corpus_file(path: str | Path, *, skip_invalid_lines: bool = False) -> CorpusFile:
    """Read one corpus file. Malformed JSON Lines raise a TokenizerError naming file and line, unless
    skip_invalid_lines, which drops them and lists them in `skipped_lines` (and on stderr)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"corpus file {path} does not exist" if not path.exists() else f"{path} is not a file")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if path.suffix != ".jsonl":
        text = _decode_utf8(raw, f"{path}")
        documents = [Document(unicodedata.normalize("NFC", text), PLAIN_TEXT_LANG, f"{path}")] if text else []
        return CorpusFile(path, digest, documents)

    documents: list[Document] = []
    skipped: list[dict] = []
    # Split on b"\n" only: a JSON line cannot hold a raw newline, while universal-newline reading would also
    # split on the \r, \x85 or \u2028 that a document may legitimately contain.
    for line_number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        origin = f"{path}:{line_number}"
        try:
            documents.append(_parse_jsonl_record(line, origin))
        except TokenizerError as error:
            if not skip_invalid_lines:
                raise
            skipped.append({"line": line_number, "reason": str(error).removeprefix(f"{origin}: ")})
            print(f"warning: skipping {error}", file=sys.stderr)
    return CorpusFile(path, digest, documents, skipped)


def _decode_utf8(raw: bytes, origin: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TokenizerError(f"{origin}: not valid UTF-8 (byte {error.start}: {error.reason})") from None


def _parse_jsonl_record(line: bytes, origin: str) -> Document:
    try:
        record = json.loads(_decode_utf8(line, origin))
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{origin}: not valid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(record, dict):
        raise TokenizerError(f"{origin}: expected a JSON object with 'text' and 'lang', got {type(record).__name__}")
    for key in ("text", "lang"):
        if not isinstance(record.get(key), str):
            found = "missing" if key not in record else f"a {type(record[key]).__name__}"
            raise TokenizerError(f"{origin}: key {key!r} must be a string, it is {found}")
    if not record["lang"]:
        raise TokenizerError(f"{origin}: key 'lang' is empty")
    return Document(unicodedata.normalize("NFC", record["text"]), record["lang"], origin)


def parse_mix(spec: str | dict[str, float], keep_zero: bool = False) -> dict[str, float]:
    """Parse `ko=0.6,en=0.25,code=0.15` (or a dict) into weights that sum to 1; entries weighted 0 are
    dropped unless `keep_zero` (the streaming sampler needs them to leave a named source out)."""
    if isinstance(spec, dict):
        items = [(str(lang), weight) for lang, weight in spec.items()]
    else:
        items = []
        for entry in spec.split(","):
            lang, sep, weight = entry.strip().partition("=")
            if not sep or not lang.strip() or not weight.strip():
                raise TokenizerError(f"--mix entry {entry.strip()!r} is not of the form lang=weight (in {spec!r})")
            items.append((lang.strip(), weight.strip()))
    weights: dict[str, float] = {}
    for lang, weight in items:
        if lang in weights:
            raise TokenizerError(f"--mix names language {lang!r} twice")
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise TokenizerError(f"--mix weight for {lang!r} is not a number: {weight!r}") from None
        if not math.isfinite(value) or value < 0:
            raise TokenizerError(f"--mix weight for {lang!r} must be a non-negative number, got {weight!r}")
        weights[lang] = value
    total = sum(weights.values())
    if total <= 0:
        raise TokenizerError(f"--mix weights sum to zero: {spec!r}")
    return {lang: value / total for lang, value in weights.items() if value > 0 or keep_zero}


@dataclass
class TrainingSample:
    documents: list[Document]
    characters_by_lang: dict[str, int]
    documents_by_lang: dict[str, int]
    excluded_by_lang: dict[str, int]  # documents of languages the mix gives no weight
    sha256: str

    @property
    def characters(self) -> int:
        return sum(self.characters_by_lang.values())

    def describe(self) -> dict:
        """The sample's record in tokenizer metadata."""
        return {
            "sha256": self.sha256,
            "characters_by_lang": self.characters_by_lang,
            "documents_by_lang": self.documents_by_lang,
            "excluded_documents_by_lang": self.excluded_by_lang,
        }


def draw_sample(
    files: list[CorpusFile], mix: dict[str, float], *, seed: int = 0, max_characters: int | None = None
) -> TrainingSample:
    """Sample whole documents so that each language's share of characters follows `mix`.

    Nothing is repeated: the language in shortest supply relative to its weight is used in full and sets the
    total, the others are subsampled in a seeded random order (the last document drawn may overshoot its
    quota by at most one document). `max_characters` caps the total further.
    """
    by_lang: dict[str, list[Document]] = {}
    for corpus_file in files:
        for document in corpus_file.documents:
            if document.text:
                by_lang.setdefault(document.lang, []).append(document)
    names = ", ".join(display_path(f.path) for f in files)
    if not by_lang:
        raise TokenizerError(f"the training corpus is empty: no non-empty documents in {names}")
    missing = [lang for lang in mix if lang not in by_lang]
    if missing:
        raise TokenizerError(
            f"--mix asks for language(s) {', '.join(map(repr, missing))} but the input has none "
            f"(languages present: {', '.join(sorted(by_lang))}; files: {names})"
        )
    available = {lang: sum(len(d.text) for d in by_lang[lang]) for lang in mix}
    total = min(available[lang] / weight for lang, weight in mix.items())
    if max_characters is not None:
        if max_characters <= 0:
            raise TokenizerError(f"--max-chars must be positive, got {max_characters}")
        total = min(total, max_characters)

    rng = random.Random(seed)
    drawn: list[Document] = []
    characters: dict[str, int] = {}
    documents: dict[str, int] = {}
    for lang in sorted(mix):
        pool = list(by_lang[lang])
        rng.shuffle(pool)
        quota = mix[lang] * total
        taken = 0
        for document in pool:
            if taken >= quota:
                break
            drawn.append(document)
            taken += len(document.text)
            documents[lang] = documents.get(lang, 0) + 1
        characters[lang] = taken
    digest = hashlib.sha256("\0".join(d.text for d in drawn).encode("utf-8")).hexdigest()
    excluded = {lang: len(docs) for lang, docs in sorted(by_lang.items()) if lang not in mix}
    return TrainingSample(drawn, characters, documents, excluded, digest)
