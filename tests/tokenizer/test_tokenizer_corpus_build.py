import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from kmodel.tokenizer import TokenizerError, corpus_build
from kmodel.tokenizer.corpus_build import (
    Source,
    build_corpus,
    clean_lines,
    fetch_packages,
    gettext_catalogues,
    goes_to_heldout,
    is_mostly_hangul,
    markup_text,
    synthesize_corpus,
)

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")


def write_mo(path: Path, messages: dict[str, str]) -> Path:
    """A minimal GNU .mo catalogue (header entry first, as msgfmt writes it)."""
    entries = sorted({"": "Content-Type: text/plain; charset=UTF-8\n", **messages}.items())
    ids = [key.encode() for key, _ in entries]
    strs = [value.encode() for _, value in entries]
    header_size = 7 * 4
    table_size = 8 * len(entries)
    data_start = header_size + 2 * table_size
    blob, id_table, str_table = b"", [], []
    for encoded, table in ((ids, id_table), (strs, str_table)):
        for item in encoded:
            table.append((len(item), data_start + len(blob)))
            blob += item + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, len(entries), header_size, header_size + table_size, 0, 0)
    tables = b"".join(struct.pack("<2I", *entry) for entry in id_table + str_table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + tables + blob)
    return path


def make_deb(debs: Path, package: str, files: dict[str, str | bytes]) -> Path:
    root = debs / f"build-{package}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n"
    )
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    deb = debs / f"{package}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


def test_mostly_hangul_lines_are_kept_and_text_is_nfc():
    assert is_mostly_hangul("대화 상자를 엽니다.")
    assert not is_mostly_hangul("Click OK 확")  # one syllable
    assert not is_mostly_hangul("See https://example.org/some/long/path 참고")  # Hangul under a quarter
    decomposed = "\u1112\u1161\u11ab\u1100\u1173\u11af 입니다"  # 한글 as conjoining jamo
    assert clean_lines(decomposed + "\nEnglish only\n", "ko") == ["한글 입니다"]
    assert clean_lines("  def f():\n\n    return 1\r\n", "code") == ["  def f():", "", "    return 1", ""]


def test_markup_text_keeps_visible_text_by_block():
    page = "<html><head><title>x</title><style>p{}</style></head><body><p>첫 문단 &amp; 끝</p><div>둘째<br>줄</div>"
    page += "<script>var a = '숨김';</script></body></html>"
    assert markup_text(page) == "첫 문단 & 끝\n둘째\n줄"


def test_gettext_translations_and_originals(tmp_path):
    write_mo(tmp_path / "usr/share/locale/ko/LC_MESSAGES/app.mo", {"Open file": "파일 열기", "Quit": "끝내기"})
    pattern = "usr/share/locale/ko/LC_MESSAGES/*.mo"
    korean = list(gettext_catalogues(pattern, side="msgstr")(tmp_path))
    english = list(gettext_catalogues(pattern, side="msgid")(tmp_path))
    assert korean == [("usr/share/locale/ko/LC_MESSAGES/app.mo#0", "파일 열기\n끝내기")]
    assert english[0][1] == "Open file\nQuit"


def test_heldout_rule_is_a_tenth_and_unseen_sources_are_all_heldout():
    source = Source("ko_x", "ko", "", (), "", lambda root: iter(()))
    unseen = Source("ko_y", "ko", "", (), "", lambda root: iter(()), unseen=True)
    heldout = sum(goes_to_heldout(source, f"doc{i}") for i in range(2000))
    assert 150 < heldout < 250
    assert goes_to_heldout(source, "doc7") == goes_to_heldout(source, "doc7")
    assert all(goes_to_heldout(unseen, f"doc{i}") for i in range(50))


def test_reserved_evaluation_packages_are_refused(tmp_path):
    with pytest.raises(TokenizerError, match="debian-faq-ko is reserved for independent evaluation"):
        fetch_packages(["debian-faq-ko"], tmp_path, download=False)
    with pytest.raises(TokenizerError, match="no emacs-common_\\*.deb in"):
        fetch_packages(["emacs-common"], tmp_path, download=False)


@needs_dpkg
def test_build_corpus_end_to_end(tmp_path, monkeypatch):
    debs = tmp_path / "debs"
    debs.mkdir()
    reserved = "이 문장은 평가용으로 따로 떼어 둔 문장입니다."
    tutorial = "\n".join(f"이것은 튜토리얼의 {i}번째 문장입니다." for i in range(40)) + f"\nplain English line\n{reserved}\n"
    make_deb(debs, "emacs-common", {"usr/share/emacs/28.2/etc/tutorials/TUTORIAL.ko": tutorial})
    # The vim tutor repeats every Emacs line (dropped as duplicates) and adds one new line.
    make_deb(debs, "vim-runtime", {"usr/share/vim/vim90/tutor/tutor.ko.utf-8": tutorial + "새로운 문장이 하나 있습니다.\n"})
    # A line of the bundled held-out split must never reach training.
    heldout_dir = tmp_path / "bundled_heldout"
    heldout_dir.mkdir()
    (heldout_dir / "ko.jsonl").write_text(json.dumps({"text": reserved, "lang": "ko"}, ensure_ascii=False) + "\n")
    monkeypatch.setattr(corpus_build, "BUNDLED_HELDOUT_DIR", heldout_dir)

    out = tmp_path / "corpus"
    manifest = build_corpus(out, debs_dir=debs, sources=["ko_tutorial_editors"], log=lambda line: None)
    record = manifest["sources"][0]
    assert record["name"] == "ko_tutorial_editors" and record["lang"] == "ko"
    assert record["duplicate_lines"] == 42  # 40 repeated lines, the reserved line twice
    assert {p["package"] for p in record["packages"]} == {"emacs-common", "vim-runtime"}
    assert all(len(p["sha256"]) == 64 for p in record["packages"])
    documents = []
    for part in ("train", "heldout"):
        path = out / part / "ko_tutorial_editors.jsonl"
        if path.exists():
            documents += [json.loads(line) for line in path.read_text().splitlines()]
    text = "\n".join(d["text"] for d in documents)
    assert "plain English line" not in text
    assert reserved not in text
    assert text.count("이것은 튜토리얼의 3번째 문장입니다.") == 1
    assert "새로운 문장이 하나 있습니다." in text
    assert json.loads((out / "manifest.json").read_text())["sources"][0]["name"] == "ko_tutorial_editors"
    with pytest.raises(TokenizerError, match="unknown corpus source 'nope'"):
        build_corpus(out, debs_dir=debs, sources=["nope"])


def test_reserved_lines_come_from_the_bundled_heldout(tmp_path):
    line = "이 문장은 평가용으로 따로 떼어 둔 문장입니다."
    (tmp_path / "ko.jsonl").write_text(json.dumps({"text": f"{line}\n짧다", "lang": "ko"}, ensure_ascii=False) + "\n")
    keys = corpus_build.reserved_lines(tmp_path)
    assert corpus_build._line_key(line) in keys
    assert corpus_build._line_key("짧다") not in keys  # too short to mean contamination


def test_synthesize_repeats_documents_in_proportion(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    (train / "ko.jsonl").write_text(
        "".join(json.dumps({"text": f"한국어 문서 {i}\n둘째 줄 {i}", "lang": "ko"}, ensure_ascii=False) + "\n" for i in range(20))
    )
    (train / "code.jsonl").write_text(
        "".join(json.dumps({"text": f"def f{i}():\n    return {i}", "lang": "code"}) + "\n" for i in range(20))
    )
    record = synthesize_corpus(train, tmp_path / "big.jsonl", 20_000, seed=1)
    assert record["bytes"] >= 20_000 and record["passes"] >= 2
    documents = [json.loads(line) for line in (tmp_path / "big.jsonl").read_text().splitlines()]
    assert {d["lang"] for d in documents} == {"ko", "code"}
    code = [d["text"] for d in documents if d["lang"] == "code"]
    assert all(text.startswith("def f") for text in code)  # code lines are never shuffled
    with pytest.raises(TokenizerError, match="has no \\*.jsonl training files"):
        synthesize_corpus(tmp_path / "empty", tmp_path / "x.jsonl", 10)


def test_heldout_samples_take_the_first_documents(tmp_path):
    heldout = tmp_path / "corpus" / "heldout"
    heldout.mkdir(parents=True)
    records = [{"text": "가" * 40, "lang": "ko"} for _ in range(10)]
    (heldout / "ko_a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (written,) = corpus_build.write_heldout_samples(tmp_path / "corpus", tmp_path / "sample", 100)
    lines = written.read_text().splitlines()
    assert written.name == "ko_a.jsonl" and len(lines) == 3  # 40 + 40 + 40 reaches 100
    assert json.loads(lines[0]) == records[0]
