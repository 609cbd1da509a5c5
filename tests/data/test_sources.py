"""Reading data files: every format, and every kind of bad file named in the error."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kmodel.config import DataSource
from kmodel.data.sources import DataError, read_file_texts, resolve_source

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_reads_jsonl_parquet_and_text_in_file_order(tmp_path):
    texts = ["첫 번째 문서", "second document", "def f():\n    return 3\n"]
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "lang": "x"} for t in texts])
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": texts}), parquet)
    txt = tmp_path / "c.txt"
    txt.write_text("한 줄\n두 줄\n", encoding="utf-8")
    assert read_file_texts(jsonl) == texts
    assert read_file_texts(parquet) == texts
    assert read_file_texts(txt) == ["한 줄", "두 줄"]


def test_text_key_selects_the_column(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "x", "text": "y"}])
    assert read_file_texts(path, "content") == ["x"]


def test_bundled_corpus_reads_completely():
    path = REPO / "data/corpus/train/ko_libreoffice_help.jsonl"
    lines = [line for line in path.read_bytes().split(b"\n") if line]
    texts = read_file_texts(path)
    assert texts == [json.loads(line)["text"] for line in lines]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.jsonl", b"", r"empty\.jsonl is empty"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": "b"\n', r"broken\.jsonl is corrupt: line 2 is not valid JSON"),
        ("latin1.jsonl", '{"text": "café"}\n'.encode("latin-1"), r"latin1\.jsonl: not valid UTF-8 text \(line 1"),
        ("latin1.txt", "ok\ncafé\n".encode("latin-1"), r"latin1\.txt: not valid UTF-8 text \(line 2"),
        ("nokey.jsonl", b'{"body": "a"}\n', r"nokey\.jsonl has no 'text' column \(columns: body\)"),
        ("number.jsonl", b'{"text": 5}\n', r"number\.jsonl: record 1 has 'text' a int, not a string"),
        ("broken.parquet", b"PAR1 not really parquet", r"broken\.parquet is corrupt: .*[Pp]arquet"),
    ],
)
def test_bad_files_raise_errors_naming_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        read_file_texts(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.jsonl does not exist"):
        read_file_texts(tmp_path / "nothere.jsonl")


def test_resolve_glob_and_directory_sorted(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.parquet", "notes.md"):
        (tmp_path / name).write_text("x")
    by_glob = resolve_source(DataSource(path=str(tmp_path / "*.jsonl")))
    assert [p.name for p in by_glob.files] == ["a.jsonl", "b.jsonl"]
    by_dir = resolve_source(DataSource(path=str(tmp_path)))
    assert [p.name for p in by_dir.files] == ["a.jsonl", "b.jsonl", "c.parquet"]
    assert by_dir.hub_name is None


def test_resolve_errors_name_the_source(tmp_path):
    with pytest.raises(DataError, match=r"'ko'.*no file matches"):
        resolve_source(DataSource(name="ko", path=str(tmp_path / "*.jsonl")))
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist"):
        resolve_source(DataSource(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"table\.csv has suffix '\.csv'"):
        resolve_source(DataSource(path=str(tmp_path / "table.csv")))


def test_a_bare_name_is_a_hub_dataset():
    resolved = resolve_source(DataSource(path="someorg/korean-web"))
    assert resolved.hub_name == "someorg/korean-web" and resolved.files == ()
