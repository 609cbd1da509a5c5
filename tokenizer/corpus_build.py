"""Build the Korean-first tokenizer corpus offline from Debian packages.

Every source is a set of Debian packages (fetched with `apt-get download` into a cache, or found there) and an
extractor that turns the unpacked files into documents. The build is deterministic and streams its output:

- text is NFC-normalised; Korean sources keep only lines that are mostly Hangul (a line with at least two
  Hangul syllables that make up at least a quarter of its non-space characters);
- Korean and English lines are deduplicated exactly across all sources of a language; code is deduplicated by
  whole document. The bundled held-out split (`data/corpus/heldout/`) is loaded first, so none of its lines
  (or code files) can reach the training part;
- each document of a source goes to `heldout/` when a hash of its id falls in one tenth of the range, else to
  `train/`; a source marked `unseen` (a domain reserved for evaluation on text the tokenizer never saw) goes
  to `heldout/` entirely;
- `manifest.json` records, per source, the packages with version and sha256, the licence, the document,
  character and dropped-duplicate counts.

konlpy's bundled corpora and the Debian FAQ are never used: they are reserved for independent evaluation
(`RESERVED_PACKAGES` refuses them).

    kmodel tokenizer build-corpus --out /data/ko-corpus [--debs /var/cache/kdebs] [--source NAME ...]
"""

from __future__ import annotations

import gettext
import gzip
import hashlib
import html.parser
import json
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import unicodedata
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .corpus import BUNDLED_HELDOUT_DIR
from .errors import TokenizerError

# Text reserved for independent evaluation: never a training source, in any form.
RESERVED_PACKAGES = frozenset({"debian-faq", "debian-faq-ko", "python3-konlpy"})
HELDOUT_SHARE = 10  # one document in ten goes to heldout/
MANIFEST_FILE = "manifest.json"
_MAX_CODE_FILE_BYTES = 200_000  # generated tables and vendored blobs are not code anyone writes
_MIN_RESERVED_LINE = 20  # bundled held-out lines shorter than this are too generic to mark contamination


@dataclass(frozen=True)
class Source:
    name: str  # the output file stem, e.g. "ko_help_gimp"
    lang: str  # "ko", "en" or "code": the `lang` field the training mix weighs
    domain: str  # what kind of text it is, for the manifest and the docs
    packages: tuple[str, ...]
    licence: str  # summary of the packages' debian/copyright for this text
    extract: Callable[[Path], Iterator[tuple[str, str]]]  # unpacked root -> (document id, raw text)
    unseen: bool = False  # evaluation only: the whole source goes to heldout/


# Extracting text.


class _TextOfMarkup(html.parser.HTMLParser):
    """The visible text of an HTML or XML page; block elements end a line, script/style are dropped."""

    _BLOCKS = frozenset(
        ["p", "div", "br", "li", "td", "th", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "title", "pre", "dt", "dd", "section", "item", "note", "tr", "table", "caption", "screen", "code", "desc", "steps", "terms", "tree", "listitem", "para"]
    )
    _HIDDEN = frozenset({"script", "style", "head", "info", "credit", "license"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self._HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._hidden_depth:
            self.parts.append(data)


def markup_text(markup: str) -> str:
    parser = _TextOfMarkup()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _files(root: Path, patterns: Iterable[str], exclude: str | None = None) -> list[Path]:
    found = {path for pattern in patterns for path in root.glob(pattern) if path.is_file()}
    return sorted(path for path in found if not (exclude and re.search(exclude, path.as_posix())))


def markup_pages(*patterns: str, exclude: str | None = None):
    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for path in _files(root, patterns, exclude):
            yield path.relative_to(root).as_posix(), markup_text(_read_text(path))

    return extract


def plain_files(*patterns: str, exclude: str | None = None, max_bytes: int | None = None):
    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for path in _files(root, patterns, exclude):
            if max_bytes is None or path.stat().st_size <= max_bytes:
                yield path.relative_to(root).as_posix(), _read_text(path)

    return extract


def tex_sources(*patterns: str):
    """TeX files, gzipped ones and those inside .tar.gz source bundles."""

    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for path in _files(root, patterns):
            if path.name.endswith(".tar.gz"):
                with tarfile.open(path) as bundle:
                    for member in sorted(bundle.getmembers(), key=lambda m: m.name):
                        if member.isfile() and member.name.endswith(".tex"):
                            text = bundle.extractfile(member).read().decode("utf-8", errors="replace")
                            yield f"{path.relative_to(root).as_posix()}/{member.name}", text
            else:
                yield path.relative_to(root).as_posix(), _read_text(path)

    return extract


def _catalogue(path: Path) -> dict:
    with path.open("rb") as handle:
        return gettext.GNUTranslations(handle)._catalog  # the parsed (msgid -> msgstr) table of the .mo file


def gettext_catalogues(*patterns: str, side: str, messages_per_document: int = 100):
    """Messages of compiled gettext catalogues (.mo): the translations (side="msgstr") or the English
    originals (side="msgid"), a document per `messages_per_document` messages."""

    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for path in _files(root, patterns):
            messages = []
            for key, value in _catalogue(path).items():
                msgid = key[0] if isinstance(key, tuple) else key
                if not msgid:  # the catalogue header
                    continue
                text = value if side == "msgstr" else msgid
                if isinstance(key, tuple) and side == "msgid" and key[1] != 0:
                    continue  # one English plural form is enough
                messages.append(text.strip())
            for start in range(0, len(messages), messages_per_document):
                document = "\n".join(m for m in messages[start : start + messages_per_document] if m)
                yield f"{path.relative_to(root).as_posix()}#{start // messages_per_document}", document

    return extract


_FTL_VALUE = re.compile(r"^\s*[-\w.]+\s*=\s*(.+)$|^\s+\.[\w-]+\s*=\s*(.+)$|^\s{4,}(\S.*)$")
_PROPERTIES_VALUE = re.compile(r"^\s*[^#!\s][^=]*=\s*(.+)$")


def mozilla_langpacks(*patterns: str):
    """String values of Fluent (.ftl) and .properties files inside Firefox/Thunderbird language packs."""

    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for path in _files(root, patterns):
            with zipfile.ZipFile(path) as pack:
                for name in sorted(pack.namelist()):
                    if not name.endswith((".ftl", ".properties")):
                        continue
                    value_pattern = _FTL_VALUE if name.endswith(".ftl") else _PROPERTIES_VALUE
                    values = []
                    for line in pack.read(name).decode("utf-8", errors="replace").splitlines():
                        if match := value_pattern.match(line):
                            values.append(next(group for group in match.groups() if group))
                    yield f"{path.name}/{name}", "\n".join(values)

    return extract


def hanja_dictionary(path_pattern: str, entries_per_document: int = 400):
    """libhangul's hanja.txt (`hangul:hanja:meaning` a line) as `hangul(hanja) meaning` lines."""

    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for path in _files(root, [path_pattern]):
            entries = []
            for line in _read_text(path).splitlines():
                if line.startswith("#") or line.count(":") < 2:
                    continue
                hangul, hanja, meaning = line.split(":", 2)
                entries.append(f"{hangul}({hanja}) {meaning}".strip())
            for start in range(0, len(entries), entries_per_document):
                yield f"{path.name}#{start // entries_per_document}", "\n".join(
                    entries[start : start + entries_per_document]
                )

    return extract


# The sources. Licences are summarised from each package's /usr/share/doc/<package>/copyright; the manifest
# records that file's sha256 so the claim can be checked against the exact package used.

_KO_CATALOGUES = (
    "usr/share/**/locale/ko/LC_MESSAGES/*.mo",
    "usr/share/vim/**/lang/ko.UTF-8/LC_MESSAGES/*.mo",
    "usr/lib/libreoffice/**/ko/LC_MESSAGES/*.mo",
)
_GETTEXT_PACKAGES = (
    "apt", "bash", "baobab", "coreutils", "debconf-i18n", "digikam-data", "dolphin", "dpkg", "evince-common",
    "evolution-data-server-common", "file-roller", "findutils", "gedit-common", "gettext", "gimp-data",
    "gnome-control-center-data", "gnome-shell-common", "gnome-system-monitor", "gnucash-common", "grep",
    "hexchat-common", "inkscape", "konsole", "kstars-data", "libc-l10n", "libglib2.0-data", "libgtk-3-common",
    "libhangul-data", "libreoffice-l10n-ko", "marble-data", "nautilus-data", "pidgin-data",
    "plasma-workspace-data", "rhythmbox-data", "sed", "synaptic", "tar", "totem-common", "vim-runtime",
    "vlc-l10n",
)  # fmt: skip

SOURCES: tuple[Source, ...] = (
    Source(
        "ko_help_libreoffice", "ko", "LibreOffice 7.4 help pages", ("libreoffice-help-ko",),
        "MPL-2.0 (The Document Foundation)",
        markup_pages("usr/share/libreoffice/help/ko/**/*.html"),
    ),
    Source(
        "ko_help_gimp", "ko", "GIMP 2.10 user manual", ("gimp-help-ko",),
        "GFDL-1.2+ (The GIMP Documentation Team)",
        markup_pages("usr/share/gimp/2.0/help/ko/**/*.html"),
    ),
    Source(
        "ko_help_gnome", "ko", "GNOME desktop and application help (Mallard pages)",
        ("gnome-user-docs", "gedit-common", "evince-common", "totem-common", "file-roller", "baobab",
         "gnome-system-monitor"),
        "CC-BY-SA-3.0 (GNOME documentation project) and the applications' GPL-2+",
        markup_pages("usr/share/help/ko/**/*.page"),
    ),
    Source(
        "ko_ui_messages", "ko", "user-interface messages: Korean gettext catalogues of 40 packages",
        _GETTEXT_PACKAGES, "each package's licence: GPL-2+/GPL-3+/LGPL-2.1+/MPL-2.0/BSD (free software)",
        gettext_catalogues(*_KO_CATALOGUES, side="msgstr"),
    ),
    Source(
        "ko_ui_mozilla", "ko", "Firefox ESR and Thunderbird user-interface strings (Fluent, .properties)",
        ("firefox-esr-l10n-ko", "thunderbird-l10n-ko"), "MPL-2.0 (Mozilla Korean localisation team)",
        mozilla_langpacks("usr/lib/**/*.xpi"),
    ),
    Source(
        "ko_dictionary_hanja", "ko", "Sino-Korean dictionary: word, hanja and meaning", ("libhangul-data",),
        "BSD-3-Clause (Choe Hwanjin)", hanja_dictionary("usr/share/libhangul/hanja/hanja.txt"),
    ),
    Source(
        "ko_tutorial_editors", "ko", "Emacs and Vim tutorials", ("emacs-common", "vim-runtime"),
        "GPL-3+ (Emacs TUTORIAL.ko), Vim licence (tutor.ko)",
        plain_files("usr/share/emacs/*/etc/tutorials/TUTORIAL.ko", "usr/share/vim/*/tutor/tutor.ko.utf-8"),
    ),
    # Domains reserved for evaluation: text the tokenizer never sees.
    Source(
        "ko_manual_debian_install", "ko", "Debian 12 installation guide (long-form technical manual)",
        ("installation-guide-amd64",), "GPL-2 (Debian Installer team)",
        markup_pages("usr/share/doc/installation-guide-amd64/ko/*.html"), unseen=True,
    ),
    Source(
        "ko_tex_documents", "ko", "Korean TeX documentation written in Korean (lshort-ko, ko.TeX, pmhanguljamo)",
        ("texlive-lang-korean",), "LPPL-1.3c / GPL (per package, TeX Live collection)",
        tex_sources("usr/share/doc/texlive-doc/**/*.tex", "usr/share/doc/texlive-doc/**/*.tex.gz",
                    "usr/share/doc/texlive-doc/**/*-src-*.tar.gz"),
        unseen=True,
    ),
    Source(
        "ko_fiction_wesnoth", "ko", "Battle for Wesnoth campaigns: narrative and dialogue",
        ("wesnoth-1.16-data",), "GPL-2+ (Wesnoth developers and translators)",
        gettext_catalogues("usr/share/games/wesnoth/**/ko/LC_MESSAGES/*.mo", "usr/share/**/ko/LC_MESSAGES/wesnoth*.mo",
                           side="msgstr", messages_per_document=40),
        unseen=True,
    ),
    Source(
        "en_docs_python", "en", "Python 3.11 documentation sources (reST), the language reference left out",
        ("python3.11-doc",), "PSF-2.0",
        plain_files("usr/share/doc/python3.11/html/_sources/**/*.txt", exclude=r"/_sources/reference/"),
    ),
    Source(
        "en_docs_perl", "en", "Perl 5.36 documentation (POD)", ("perl-doc",), "GPL-1+ or Artistic (Larry Wall et al.)",
        plain_files("usr/share/perl/*/pod/*.pod"),
    ),
    Source(
        "en_docs_git", "en", "Git manual pages and guides (AsciiDoc sources)", ("git-doc",),
        "GPL-2 (Junio C Hamano and the Git contributors)", plain_files("usr/share/doc/git-doc/*.txt"),
    ),
    Source(
        "en_help_libreoffice", "en", "LibreOffice 7.4 help pages (English originals)", ("libreoffice-help-en-us",),
        "MPL-2.0 (The Document Foundation)", markup_pages("usr/share/libreoffice/help/en-US/**/*.html"),
    ),
    Source(
        "en_help_gnome", "en", "GNOME desktop help (English originals)", ("gnome-user-docs",),
        "CC-BY-SA-3.0 (GNOME documentation project)", markup_pages("usr/share/help/C/**/*.page"),
    ),
    Source(
        "en_reference_debian", "en", "Debian Reference (English)", ("debian-reference-en",),
        "GPL-2+ (Osamu Aoki)", markup_pages("usr/share/debian-reference/*.en.html"), unseen=True,
    ),
    Source(
        "en_ui_messages", "en", "user-interface messages: the English originals of the Korean catalogues",
        _GETTEXT_PACKAGES, "each package's licence (as ko_ui_messages)",
        gettext_catalogues(*_KO_CATALOGUES, side="msgid"),
    ),
    Source(
        "code_python", "code", "CPython 3.11 standard library", ("libpython3.11-stdlib",), "PSF-2.0",
        plain_files("usr/lib/python3.11/**/*.py", exclude=r"/(test|idlelib)/", max_bytes=_MAX_CODE_FILE_BYTES),
    ),
    Source(
        "code_c", "code", "GNU C library headers", ("libc6-dev",), "LGPL-2.1+ (Free Software Foundation)",
        plain_files("usr/include/**/*.h", max_bytes=_MAX_CODE_FILE_BYTES),
    ),
    Source(
        "code_cpp", "code", "GNU C++ standard library headers (libstdc++ 12)", ("libstdc++-12-dev",),
        "GPL-3+ with the GCC Runtime Library Exception (Free Software Foundation)",
        plain_files("usr/include/c++/*/**/*", max_bytes=_MAX_CODE_FILE_BYTES),
    ),
    Source(
        "code_go", "code", "Go 1.19 standard library", ("golang-1.19-src",), "BSD-3-Clause (The Go Authors)",
        plain_files("usr/share/go-1.19/src/**/*.go", exclude=r"(_test\.go|/testdata/|/vendor/)",
                    max_bytes=_MAX_CODE_FILE_BYTES),
    ),
    Source(
        "code_rust", "code", "Rust standard library sources", ("rust-src",), "MIT OR Apache-2.0 (Rust developers)",
        plain_files("usr/lib/rustlib/src/rust/library/**/*.rs", exclude=r"/(tests|benches)/",
                    max_bytes=_MAX_CODE_FILE_BYTES),
        unseen=True,
    ),
)  # fmt: skip
SOURCES_BY_NAME = {source.name: source for source in SOURCES}


# Cleaning.

_HANGUL_SYLLABLE = re.compile("[\uac00-\ud7a3]")


def is_mostly_hangul(line: str) -> bool:
    syllables = len(_HANGUL_SYLLABLE.findall(line))
    visible = sum(1 for char in line if not char.isspace())
    return syllables >= 2 and syllables * 4 >= visible


def clean_lines(text: str, lang: str) -> list[str]:
    """NFC lines of a document worth keeping: mostly-Hangul lines for Korean, non-blank lines otherwise
    (code keeps every line, blank ones included, and its indentation)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
    if lang == "code":
        return text.split("\n")
    lines = [line.strip() for line in text.split("\n")]
    if lang == "ko":
        return [line for line in lines if is_mostly_hangul(line)]
    return [line for line in lines if line]


def _line_key(line: str) -> bytes:
    return hashlib.blake2b(line.encode("utf-8"), digest_size=12).digest()


def reserved_lines(heldout_dir: Path | None = None) -> set[bytes]:
    """Keys of the bundled held-out lines, which no training document may contain."""
    keys = set()
    for path in sorted((heldout_dir or BUNDLED_HELDOUT_DIR).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                text = unicodedata.normalize("NFC", json.loads(line)["text"])
                keys.update(_line_key(part.strip()) for part in text.split("\n") if len(part.strip()) >= _MIN_RESERVED_LINE)
    return keys


def goes_to_heldout(source: Source, document_id: str) -> bool:
    if source.unseen:
        return True
    digest = hashlib.sha256(f"{source.name}\0{document_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_SHARE == 0


# Packages.


def fetch_packages(packages: Iterable[str], debs_dir: Path, download: bool) -> dict[str, Path]:
    """The .deb of each package in `debs_dir`, downloaded with `apt-get download` when missing and allowed."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for package in sorted(set(packages)):
        if package in RESERVED_PACKAGES:
            raise TokenizerError(f"package {package} is reserved for independent evaluation and cannot be a source")
        matches = sorted(debs_dir.glob(f"{package}_*.deb"))
        if not matches and download:
            result = subprocess.run(["apt-get", "download", package], cwd=debs_dir, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise TokenizerError(
                    f"apt-get download {package} failed: {result.stderr.strip().splitlines()[-1:]} "
                    f"(run `apt-get update` first, or put {package}_*.deb into {debs_dir})"
                )
            matches = sorted(debs_dir.glob(f"{package}_*.deb"))
        if not matches:
            raise TokenizerError(
                f"no {package}_*.deb in {debs_dir}; rerun with --download or copy the package there"
            )
        found[package] = matches[-1]
    return found


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(deb: Path, into: Path) -> None:
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise TokenizerError(f"dpkg-deb -x {deb} failed: {result.stderr.strip()}")


def _package_record(package: str, deb: Path, root: Path) -> dict:
    copyright_file = root / "usr" / "share" / "doc" / package / "copyright"
    return {
        "package": package,
        "deb": deb.name,
        "sha256": _sha256_file(deb),
        "copyright_sha256": _sha256_file(copyright_file) if copyright_file.is_file() else None,
    }


# The build.


def build_corpus(
    out_dir: str | Path,
    *,
    debs_dir: str | Path,
    download: bool = False,
    sources: Iterable[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build `out_dir/train/*.jsonl`, `out_dir/heldout/*.jsonl` and `out_dir/manifest.json`; returns the manifest."""
    chosen = list(SOURCES) if sources is None else [_source(name) for name in sources]
    out = Path(out_dir)
    for part in ("train", "heldout"):
        (out / part).mkdir(parents=True, exist_ok=True)
    debs = fetch_packages((p for s in chosen for p in s.packages), Path(debs_dir), download)
    seen_lines = reserved_lines()
    seen_documents: set[bytes] = set()
    records = []
    with tempfile.TemporaryDirectory(prefix="kmodel-corpus-") as scratch:
        for source in chosen:
            root = Path(scratch) / source.name
            for package in source.packages:
                _unpack(debs[package], root)
            record = _write_source(source, root, out, seen_lines, seen_documents)
            record["packages"] = [_package_record(p, debs[p], root) for p in source.packages]
            shutil.rmtree(root)  # unpacked sources run to gigabytes (rust-src, golang): keep one at a time
            records.append(record)
            log(
                f"{source.name}: {record['train']['documents']:,} train / {record['heldout']['documents']:,} held-out "
                f"documents, {record['train']['characters'] + record['heldout']['characters']:,} characters, "
                f"{record['duplicate_lines']:,} duplicate lines dropped"
            )
    manifest = {
        "format": "kmodel-corpus/1",
        "heldout_rule": f"sha256(source, document id) % {HELDOUT_SHARE} == 0, or the whole source when unseen",
        "sources": records,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


BUILD_COMMAND = "kmodel tokenizer build-corpus --out CORPUS --debs DEBS --download"


def corpus_root(path: str | Path) -> Path | None:
    """The built corpus that a file of its train/ or heldout/ part belongs to (the directory holding the
    manifest), or None for any other file."""
    parent = Path(path).resolve().parent
    if parent.name in ("train", "heldout") and (parent.parent / MANIFEST_FILE).is_file():
        return parent.parent
    return None


def _deb_version(deb_name: str) -> str:
    """`libreoffice-help-ko_4%3a7.4.7-1+deb12u14_all.deb` -> `4:7.4.7-1+deb12u14` (apt quotes the epoch colon)."""
    parts = deb_name.split("_")
    return urllib.parse.unquote(parts[1]) if len(parts) == 3 else deb_name


def corpus_provenance(root: str | Path, source_names: Iterable[str]) -> dict:
    """What rebuilds the part of the corpus at `root` that a tokenizer was trained on, without machine paths:
    the build command, the manifest's sha256, and per source its domain, licence and Debian packages (name,
    version, .deb sha256)."""
    manifest_path = Path(root) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    wanted = set(source_names)
    sources = [
        {
            "name": source["name"],
            "lang": source["lang"],
            "domain": source["domain"],
            "licence": source["licence"],
            "packages": [
                {"package": package["package"], "version": _deb_version(package["deb"]), "deb_sha256": package["sha256"]}
                for package in source["packages"]
            ],
        }
        for source in manifest["sources"]
        if source["name"] in wanted
    ]
    return {
        "command": BUILD_COMMAND,
        "distribution": "Debian 12 (bookworm)",
        "manifest_sha256": _sha256_file(manifest_path),
        "heldout_rule": manifest["heldout_rule"],
        "sources": sources,
    }


def _source(name: str) -> Source:
    if name not in SOURCES_BY_NAME:
        raise TokenizerError(f"unknown corpus source {name!r}; choose from {', '.join(SOURCES_BY_NAME)}")
    return SOURCES_BY_NAME[name]


def _write_source(source: Source, root: Path, out: Path, seen_lines: set[bytes], seen_documents: set[bytes]) -> dict:
    counts = {part: {"documents": 0, "characters": 0} for part in ("train", "heldout")}
    duplicate_lines = duplicate_documents = 0
    with (out / "train" / f"{source.name}.jsonl").open("w", encoding="utf-8") as train, (
        out / "heldout" / f"{source.name}.jsonl"
    ).open("w", encoding="utf-8") as heldout:
        for document_id, raw in source.extract(root):
            lines = clean_lines(raw, source.lang)
            if source.lang == "code":
                text = "\n".join(lines).strip("\n") + "\n"
                key = _line_key(text)
                long_lines = [line.strip() for line in lines if len(line.strip()) >= _MIN_RESERVED_LINE]
                reserved = sum(1 for line in long_lines if _line_key(line) in seen_lines)
                if key in seen_documents or (long_lines and reserved * 2 >= len(long_lines)):
                    duplicate_documents += 1
                    continue
                seen_documents.add(key)
            else:
                kept = []
                for line in lines:
                    key = _line_key(line)
                    if key in seen_lines:
                        duplicate_lines += 1
                        continue
                    seen_lines.add(key)
                    kept.append(line)
                text = "\n".join(kept)
            if not text.strip():
                continue
            part = "heldout" if goes_to_heldout(source, document_id) else "train"
            record = {"text": text, "lang": source.lang, "source": f"{source.name}:{document_id}"}
            (heldout if part == "heldout" else train).write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[part]["documents"] += 1
            counts[part]["characters"] += len(text)
    for part, count in counts.items():
        if not count["documents"]:  # an empty file would only trip the tools that read the split
            (out / part / f"{source.name}.jsonl").unlink()
    return {
        "name": source.name,
        "lang": source.lang,
        "domain": source.domain,
        "licence": source.licence,
        "unseen": source.unseen,
        **counts,
        "duplicate_lines": duplicate_lines,
        "duplicate_documents": duplicate_documents,
    }


def write_heldout_samples(corpus_dir: str | Path, out_dir: str | Path, max_chars: int) -> list[Path]:
    """Copy the first held-out documents of each source, up to `max_chars` characters (at least one document),
    into `out_dir`: a sample small enough to commit, so evaluations can be rerun from a clean clone."""
    written = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted((Path(corpus_dir) / "heldout").glob("*.jsonl")):
        taken, lines = 0, []
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if lines and taken >= max_chars:
                    break
                lines.append(line)
                taken += len(json.loads(line)["text"])
        (out / path.name).write_text("".join(lines), encoding="utf-8")
        written.append(out / path.name)
    return written


def synthesize_corpus(train_dir: str | Path, out_path: str | Path, target_bytes: int, *, seed: int = 0) -> dict:
    """Write a JSON Lines corpus of about `target_bytes` from the training documents, for measuring training
    at scale when the real corpus is smaller. Each pass reads the training files side by side, drawing the next
    document from a file chosen with probability proportional to its size, so every prefix keeps the languages'
    proportions; from the second pass on, the lines of Korean and English documents are shuffled, so repeats
    are not verbatim. Streams: one document at a time is held."""
    files = sorted(Path(train_dir).glob("*.jsonl"))
    if not files:
        raise TokenizerError(f"{train_dir} has no *.jsonl training files; run `kmodel tokenizer build-corpus` first")
    rng = random.Random(seed)
    written = passes = documents = 0
    with Path(out_path).open("w", encoding="utf-8") as out:
        while written < target_bytes:
            passes += 1
            handles = [path.open(encoding="utf-8") for path in files]
            weights = [float(path.stat().st_size) for path in files]
            while written < target_bytes and any(weights):
                chosen = rng.choices(range(len(handles)), weights)[0]
                line = handles[chosen].readline()
                if not line:
                    weights[chosen] = 0.0
                    continue
                if not line.strip():
                    continue
                record = json.loads(line)
                lines = record["text"].split("\n")
                if passes > 1 and record["lang"] != "code":
                    rng.shuffle(lines)
                line = json.dumps({"text": "\n".join(lines), "lang": record["lang"]}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                documents += 1
            for handle in handles:
                handle.close()
    return {"bytes": written, "documents": documents, "passes": passes, "files": [path.name for path in files]}
