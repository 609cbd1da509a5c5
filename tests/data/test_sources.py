"""Reading data files: every format, and every kind of bad file named in the error."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kmodel.config import DataSource
from kmodel.data.sources import DataError, file_parts, read_documents, read_file_texts, resolve_source

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
        ("nokey.jsonl", b'{"text": "a"}\n{"body": "a"}\n', r"nokey\.jsonl line 2 has no 'text' key \(keys: body\)"),
        ("number.jsonl", b'{"text": 5}\n', r"number\.jsonl line 1 has 'text' a int, not a string"),
        ("array.json", b'[{"text": "a"}, {"body": 1}]', r"array\.json record 2 has no 'text' key"),
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


def test_parts_of_a_line_file_hold_every_line_once(tmp_path):
    texts = [f"문서 {i} " + "가" * (i % 7) for i in range(200)]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    for part_bytes in (1, 17, 100, 1000, 1 << 20):
        parts = file_parts(path, part_bytes)
        read = [t for start, stop in parts for t in read_documents(str(path), "text", start, stop)]
        assert read == texts, part_bytes


def test_parts_of_a_parquet_file_are_row_groups(tmp_path):
    texts = [f"row {i}" for i in range(100)]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10)
    parts = file_parts(path, 1)
    assert len(parts) == 10
    assert [t for start, stop in parts for t in read_documents(str(path), "text", start, stop)] == texts


def test_an_error_in_a_later_part_names_the_line_in_the_whole_file(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(50)]
    lines[37] = '{"text": broken'
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    start, stop = next((a, b) for a, b in file_parts(path, 64) if a > 0 and b > sum(len(x) + 1 for x in lines[:37]))
    with pytest.raises(DataError, match=r"a\.jsonl is corrupt: line 38 is not valid JSON"):
        list(read_documents(str(path), "text", start, stop))
