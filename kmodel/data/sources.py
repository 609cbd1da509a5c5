"""Where training text comes from: a recipe's data source resolved to files, and each file streamed as documents.

A source `path` is a local file, a glob, a directory (every .jsonl/.json/.parquet/.txt file under it), or,
when nothing local matches, a Hugging Face Hub dataset name (its `train` split, streamed through `datasets`).

Files are read in parts so that several workers can tokenize one large file: a JSON Lines or text file is
cut into byte ranges (a part holds the lines that *start* inside its range), a parquet file into runs of row
groups; a .json document and a Hub dataset are one part each. Reading streams: memory holds one batch of
documents, never a file. Every problem — missing, empty, corrupt, not UTF-8, without the text key — raises
a DataError naming the file and the line (or record).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kmodel.config import DataSource

SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
LINE_FORMATS = (".jsonl", ".txt")  # formats cut into byte ranges
HUB_PREFIX = "hub:"


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
        found = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not found:
            raise DataError(f"data source {source.name or path!r}: directory {local} holds no {list(SUFFIXES)} file")
        return SourceFiles(source, tuple(found))
    under_local_dir = "/" in path and local.parent.is_dir()  # "data/trian": the folder exists here, a typo
    if local.is_absolute() or path.startswith(".") or local.suffix in SUFFIXES or path.count("/") > 1 or under_local_dir:
        # Looks like a local path, not a Hub "owner/name": say it is missing rather than try the network.
        raise DataError(f"data source {source.name or path!r}: {path} does not exist")
    return SourceFiles(source, hub_name=path)


def _check_suffix(path: Path, source: DataSource) -> Path:
    if path.suffix not in SUFFIXES:
        raise DataError(
            f"data source {source.name or source.path!r}: {path} has suffix {path.suffix!r}; "
            f"readable formats are {', '.join(SUFFIXES)}"
        )
    return path


def check_readable(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")


# --- parts ----------------------------------------------------------------------------------------------------
def file_parts(path: Path, part_bytes: int) -> list[tuple[int, int]]:
    """How a file is cut for the workers: byte ranges (line formats), row-group ranges (parquet), or one part."""
    check_readable(path)
    if path.suffix in LINE_FORMATS:
        size = path.stat().st_size
        return [(start, min(start + part_bytes, size)) for start in range(0, size, part_bytes)]
    if path.suffix == ".parquet":
        metadata = _parquet_file(path).metadata
        parts, first, size = [], 0, 0
        for group in range(metadata.num_row_groups):
            size += metadata.row_group(group).total_byte_size
            if size >= part_bytes:
                parts.append((first, group + 1))
                first, size = group + 1, 0
        if first < metadata.num_row_groups or not parts:
            parts.append((first, metadata.num_row_groups))
        return parts
    return [(0, 1)]


# --- reading -------------------------------------------------------------------------------------------------
def read_documents(path: str, text_key: str, start: int, stop: int) -> Iterator[str]:
    """The documents of one part (see `file_parts`), in file order; `path` may be `hub:NAME`."""
    if path.startswith(HUB_PREFIX):
        yield from _hub_documents(path[len(HUB_PREFIX):], text_key)
        return
    file = Path(path)
    check_readable(file)
    if file.suffix in LINE_FORMATS:
        yield from _line_documents(file, text_key, start, stop)
    elif file.suffix == ".parquet":
        yield from _parquet_documents(file, text_key, start, stop)
    else:
        yield from _json_documents(file, text_key)


def read_file_texts(path: Path, text_key: str = "text") -> list[str]:
    """Every document of a local file (small files and tests; training streams parts instead)."""
    path = Path(path)
    texts = [t for start, stop in file_parts(path, 1 << 62) for t in read_documents(str(path), text_key, start, stop)]
    if not texts:
        raise DataError(f"data file {path} holds no documents")
    return texts


def _line_number(path: Path, offset: int, local_line: int) -> int:
    """1-based line number of the `local_line`-th line counted from byte `offset` (errors only: reads the prefix)."""
    before = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 24))
            before += block.count(b"\n")
            remaining -= len(block)
    return before + local_line


def _line_documents(path: Path, text_key: str, start: int, stop: int) -> Iterator[str]:
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line that began before `start` belongs to the previous part
        position, local = f.tell(), 0
        while position < stop:
            raw = f.readline()
            if not raw:
                break
            local += 1
            line_start, position = position, position + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                number = _line_number(path, line_start, 1)
                raise DataError(f"{path}: not valid UTF-8 text (line {number}, byte {line_start + error.start}: "
                                f"{error.reason})") from None
            if not line.strip():
                continue
            if path.suffix == ".txt":
                yield line.rstrip("\r\n")
                continue
            try:
                record = json.loads(line)
            except ValueError as bad:
                number = _line_number(path, line_start, 1)
                raise DataError(f"data file {path} is corrupt: line {number} is not valid JSON ({bad})") from None
            yield _text_of(record, text_key, lambda: f"{path} line {_line_number(path, line_start, 1)}")


def _text_of(record, text_key: str, where) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where()}: a JSON {type(record).__name__}, not an object with a {text_key!r} key")
    text = record.get(text_key)
    if isinstance(text, str):
        return text
    if text_key not in record:
        raise DataError(f"{where()} has no {text_key!r} key (keys: {', '.join(record)}); set the source's text_key")
    raise DataError(f"{where()} has {text_key!r} a {type(text).__name__}, not a string")


def _json_documents(path: Path, text_key: str) -> Iterator[str]:
    """A .json file: one JSON array of records, or JSON Lines under a .json name."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}: not valid UTF-8 text (line {line}, byte {error.start}: {error.reason})") from None
    try:
        records = json.loads(text)
    except ValueError:
        yield from _line_documents(path, text_key, 0, len(raw))
        return
    if not isinstance(records, list):
        records = [records]
    for index, record in enumerate(records):
        yield _text_of(record, text_key, lambda: f"{path} record {index + 1}")


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as error:  # Arrow raises several types for a damaged file; name the file once
        raise DataError(f"data file {path} is corrupt: {type(error).__name__}: {error}") from None


def _parquet_documents(path: Path, text_key: str, first_group: int, stop_group: int) -> Iterator[str]:
    import pyarrow as pa

    table = _parquet_file(path)
    schema = table.schema_arrow
    if text_key not in schema.names:
        raise DataError(f"{path} has no {text_key!r} column (columns: {', '.join(schema.names)}); set text_key")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_key!r} holds {kind}, not strings")
    record = sum(table.metadata.row_group(g).num_rows for g in range(first_group))
    groups = list(range(first_group, stop_group))
    if not groups:
        return
    for batch in table.iter_batches(row_groups=groups, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            record += 1
            if text is None:
                raise DataError(f"{path}: record {record} has {text_key!r} missing, not a string")
            yield text


def _hub_documents(name: str, text_key: str) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # failures are re-raised as DataError
    try:
        rows = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as error:
        raise DataError(
            f"data source {name!r} is neither a local file nor a loadable Hugging Face Hub dataset "
            f"({type(error).__name__}: {error})"
        ) from None
    for index, row in enumerate(rows):
        yield _text_of(row, text_key, lambda: f"Hub dataset {name} record {index + 1}")
