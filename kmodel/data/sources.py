"""Where training text comes from: a recipe's data source resolved to files, and each file read into documents.

A source `path` is a local file, a glob, a directory (every .jsonl/.json/.parquet/.txt file under it), or,
when nothing local matches, a Hugging Face Hub dataset name (its `train` split; needs network the first
time). Reading goes through the `datasets` library, imported lazily; every problem with a file — missing,
empty, corrupt, not UTF-8, without the text column — raises a DataError that names the file.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from kmodel.config import DataSource

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
# Formats whose raw bytes must be UTF-8 text (parquet strings are validated by Arrow itself).
TEXT_FORMATS = {".jsonl", ".json", ".txt"}


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file (and key or value) at fault."""


@dataclass(frozen=True)
class SourceFiles:
    """A data source resolved to what is read: local files in a fixed order, or one Hub dataset."""

    source: DataSource
    files: tuple[Path, ...] = ()
    hub_name: str | None = None

    @property
    def label(self) -> str:
        return self.source.name or self.source.path


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def resolve_source(source: DataSource) -> SourceFiles:
    """The files a source names, sorted so the order never depends on the file system."""
    path = source.path
    if _is_glob(path):
        matches = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"data source {source.name or path!r}: no file matches {path!r}")
        return SourceFiles(source, tuple(_check_suffix(p, source) for p in matches))
    local = Path(path)
    if local.is_file():
        return SourceFiles(source, (_check_suffix(local, source),))
    if local.is_dir():
        found = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not found:
            raise DataError(f"data source {source.name or path!r}: directory {local} holds no {sorted(BUILDERS)} file")
        return SourceFiles(source, tuple(found))
    if local.is_absolute() or path.startswith(".") or local.suffix in BUILDERS or path.count("/") > 1:
        # Looks like a local path, not a Hub "owner/name": say it is missing rather than try the network.
        raise DataError(f"data source {source.name or path!r}: {path} does not exist")
    return SourceFiles(source, hub_name=path)


def _check_suffix(path: Path, source: DataSource) -> Path:
    if path.suffix not in BUILDERS:
        raise DataError(
            f"data source {source.name or source.path!r}: {path} has suffix {path.suffix!r}; "
            f"readable formats are {', '.join(sorted(BUILDERS))}"
        )
    return path


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # failures are re-raised as DataError
    return datasets


def _check_utf8(path: Path) -> None:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}: not valid UTF-8 text (line {line}, byte {error.start}: {error.reason})") from None


def _describe_failure(path: Path, error: BaseException) -> str:
    """The most useful account of why a file did not load: the first bad line of a JSON Lines file,
    otherwise the innermost error `datasets` raised."""
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError as bad:
                return f"line {number} is not valid JSON ({bad})"
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def read_file_texts(path: Path, text_key: str = "text") -> list[str]:
    """Every document's text in a local file, in file order (a .txt file gives one document per line)."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    if path.suffix in TEXT_FORMATS:
        _check_utf8(path)
    datasets = _quiet_datasets()
    try:
        # Streaming reads the file directly, without writing an Arrow copy to the datasets cache.
        rows = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train", streaming=True)
        texts = _column(rows, text_key, str(path))
    except DataError:
        raise
    except Exception as error:  # datasets wraps Arrow/JSON errors in several types; name the file once
        raise DataError(f"data file {path} is corrupt: {_describe_failure(path, error)}") from None
    if not texts:
        raise DataError(f"data file {path} holds no documents")
    return texts


def read_hub_texts(name: str, text_key: str = "text") -> tuple[list[str], list[Path]]:
    """A Hub dataset's `train` split: its texts and the cached Arrow files they were read from."""
    datasets = _quiet_datasets()
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as error:
        raise DataError(
            f"data source {name!r} is neither a local file nor a loadable Hugging Face Hub dataset "
            f"({type(error).__name__}: {error})"
        ) from None
    texts = _column(rows, text_key, f"Hub dataset {name}")
    if not texts:
        raise DataError(f"Hub dataset {name} holds no documents")
    return texts, [Path(f["filename"]) for f in rows.cache_files]


def _column(rows, text_key: str, where: str) -> list[str]:
    columns = rows.column_names
    if columns is not None and text_key not in columns:
        raise DataError(f"{where} has no {text_key!r} column (columns: {', '.join(columns)}); set text_key")
    texts = []
    for index, row in enumerate(rows):
        text = row.get(text_key)
        if not isinstance(text, str):
            found = "missing" if text_key not in row else f"a {type(text).__name__}"
            raise DataError(f"{where}: record {index + 1} has {text_key!r} {found}, not a string")
        texts.append(text)
    return texts
