import json
import re
from pathlib import Path

import pytest
from kmodel.tokenizer import SHIPPED_TOKENIZER, Tokenizer
from kmodel.tokenizer.corpus import BUNDLED_HELDOUT_DIR, BUNDLED_TRAIN_DIR


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def machine_paths(value) -> list[str]:
    """Every word of every string (keys included) in a JSON value that is an absolute or home-relative path."""
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in machine_paths(key) + machine_paths(item)]
    if isinstance(value, list):
        return [found for item in value for found in machine_paths(item)]
    if isinstance(value, str):
        return [word for word in value.split() if re.match(r"(/|~|[A-Za-z]:[\\/])", word)]
    return []


def read_bundled(path: Path, limit: int) -> list[dict]:
    """The first `limit` parseable records of a bundled corpus file."""
    records = []
    for line in path.read_bytes().split(b"\n"):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
        if len(records) == limit:
            break
    return records


@pytest.fixture
def make_jsonl(tmp_path):
    """Write records to tmp_path/NAME and return the path."""
    return lambda name, records: write_jsonl(tmp_path / name, records)


@pytest.fixture(scope="session")
def shipped() -> Tokenizer:
    return Tokenizer.load(SHIPPED_TOKENIZER)


@pytest.fixture(scope="session")
def heldout_documents() -> list[dict]:
    records = []
    for path in sorted(BUNDLED_HELDOUT_DIR.glob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> list[Path]:
    """A slice of the bundled train split (about 60k characters), enough for vocabularies of ~1k."""
    directory = tmp_path_factory.mktemp("small_corpus")
    return [
        write_jsonl(directory / "ko.jsonl", read_bundled(BUNDLED_TRAIN_DIR / "ko_libreoffice_help.jsonl", 80)),
        write_jsonl(directory / "en.jsonl", read_bundled(BUNDLED_TRAIN_DIR / "en_python_docs.jsonl", 4)),
        write_jsonl(directory / "code.jsonl", read_bundled(BUNDLED_TRAIN_DIR / "code_python_stdlib.jsonl", 2)),
    ]
