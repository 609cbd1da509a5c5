"""Streaming training: the one-pass sample, both BPE learners, and the HF-merges-to-SentencePiece conversion."""

import json

import pytest
from conftest import machine_paths
from kmodel.tokenizer import Tokenizer, TokenizerError
from kmodel.tokenizer.stream_train import (
    HF_PRESPLIT,
    SPACE_SYMBOL,
    alphabet_for_coverage,
    learn_hf_merges,
    sample_corpus,
    sentencepiece_bpe_model,
    train_streaming,
)

tokenizers = pytest.importorskip("tokenizers")

HARD = [
    "옛한글 ᄒᆞᆫ글 나랏〮말〯ᄊᆞ미〮 ᄫᅵ",
    "가족 👨‍👩‍👧‍👦 무지개 🏳️‍🌈 개발자 👩🏽‍💻 국기 🇰🇷",
    "한국어 English 日本語 中文 Ελληνικά русский عربى",
    "\tindented\t\ttabs\t",
    "runs   of     spaces" + " " * 40 + "end",
    "def f(x):\n        return x  # 주석\n",
    "<|user|>안녕<|end|>",
]


def write_lines(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_sample_keeps_the_mix_exact_and_is_seeded(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [{"text": "가" * 100, "lang": "ko"} for _ in range(50)]
        + [{"text": "a" * 100, "lang": "en"} for _ in range(500)]
        + [{"text": "x", "lang": "other"}],
    )
    texts, record = sample_corpus([path], {"ko": 0.5, "en": 0.5}, 1_000_000, seed=3)
    chars = record["sample"]["characters_by_lang"]
    assert chars == {"en": 5000, "ko": 5000}  # Korean is scarcest: used in full, sets the total
    assert record["sample"]["excluded_documents_by_lang"] == {"other": 1}
    assert record["files"][0]["documents"] == 551 and len(record["files"][0]["sha256"]) == 64
    again, _ = sample_corpus([path], {"ko": 0.5, "en": 0.5}, 1_000_000, seed=3)
    assert again == texts
    _, record = sample_corpus([path], {"ko": 0.5, "en": 0.5}, 2000, seed=3)
    assert record["sample"]["characters_by_lang"] == {"en": 1000, "ko": 1000}


def test_upsampling_repeats_the_scarce_language(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [{"text": f"가나다{i}" * 25, "lang": "ko"} for i in range(10)] + [{"text": "a" * 100, "lang": "en"}] * 300,
    )
    texts, record = sample_corpus([path], {"ko": 0.5, "en": 0.5}, 20_000, seed=0, upsample=True)
    assert record["sample"]["repeats_by_lang"] == {"en": 1, "ko": 10}
    korean = [text for text in texts if text.startswith("가")]
    assert len(korean) == 100 and len(set(korean)) == 10


def test_a_source_named_in_the_mix_gets_its_own_share_or_is_left_out(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [{"text": "가" * 100, "lang": "ko", "source": f"ko_help:page{i}"} for i in range(40)]
        + [{"text": "漢" * 100, "lang": "ko", "source": f"ko_dictionary:part{i}"} for i in range(40)]
        + [{"text": "a" * 100, "lang": "en"} for _ in range(80)],
    )
    _, record = sample_corpus([path], {"ko": 0.4, "ko_dictionary": 0.1, "en": 0.5}, 8000, seed=0)
    assert record["sample"]["characters_by_lang"] == {"en": 4000, "ko": 3200, "ko_dictionary": 800}
    texts, record = sample_corpus([path], {"ko": 0.5, "ko_dictionary": 0.0, "en": 0.5}, 8000, seed=0)
    assert record["sample"]["excluded_documents_by_lang"] == {"ko_dictionary": 40}
    assert not any("漢" in text for text in texts) and sum(text.startswith("가") for text in texts) == 40


def test_sample_errors_name_the_culprit(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"text": "a", "lang": "en"}])
    with pytest.raises(TokenizerError, match="--mix asks for language\\(s\\) or source\\(s\\) 'ko'"):
        sample_corpus([path], {"ko": 1.0}, 100, seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "lang": "en"}\n{oops\n', encoding="utf-8")
    with pytest.raises(TokenizerError, match="bad.jsonl:2: not valid JSON"):
        sample_corpus([bad], {"en": 1.0}, 100, seed=0)
    with pytest.raises(TokenizerError, match="'ko_hanja'"):
        sample_corpus([path], {"en": 0.5, "ko_hanja": 0.5}, 100, seed=0)


def test_presplit_keeps_pieces_within_a_word_and_a_script():
    pre = tokenizers.pre_tokenizers.Split(tokenizers.Regex(HF_PRESPLIT), behavior="isolated")
    text = "대화Box를   열고 2024년):\n\t끝".replace(" ", SPACE_SYMBOL)
    words = [word for word, _ in pre.pre_tokenize_str(text)]
    assert "".join(words) == text
    assert words == ["대화", "Box", "를", "▁▁", "▁열고", "▁2", "0", "2", "4", "년", "):\n", "\t", "끝"]
    words = [word for word, _ in pre.pre_tokenize_str("x.append(self)\n▁▁▁▁return▁“대화”")]
    assert words == ["x", ".append", "(self", ")\n", "▁▁▁", "▁return", "▁“대화", "”"]


def test_presplit_lets_korean_endings_and_short_punctuation_leads_form_pieces():
    pre = tokenizers.pre_tokenizers.Split(tokenizers.Regex(HF_PRESPLIT), behavior="isolated")
    text = "설정합니다.\n다음, 그리고 (see \\cs{이라} 됩니까?\n\n /// x:::y".replace(" ", SPACE_SYMBOL)
    words = [word for word, _ in pre.pre_tokenize_str(text)]
    assert words == [
        "설정합니다.\n", "다음,", "▁그리고", "▁(see", "▁\\cs", "{이라", "}", "▁됩니까?\n\n", "▁///", "▁x", ":::", "y",
    ]  # fmt: skip


def test_hf_merges_replayed_by_sentencepiece(small_corpus, heldout_documents):
    """The converted model must compress like the Hugging Face BPE it came from (within 2%: SentencePiece may
    merge across the pre-split inside a space-led word, which sometimes takes a pair a later merge needed)."""
    texts = [json.loads(line)["text"] for path in small_corpus for line in path.read_text().splitlines()]
    alphabet = alphabet_for_coverage(texts, 0.9999)
    merges = learn_hf_merges(texts, 1500, alphabet)
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(sentencepiece_bpe_model(merges, alphabet, 268 + len(alphabet) + 1500))
    vocab = {f"<0x{byte:02X}>": byte for byte in range(256)}  # byte fallback on both sides
    for piece in alphabet + [left + right for left, right in merges]:
        vocab.setdefault(piece, len(vocab))
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    hf.normalizer = tokenizers.normalizers.Replace(" ", SPACE_SYMBOL)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(HF_PRESPLIT), behavior="isolated")
    documents = [record["text"] for record in heldout_documents[::3]]
    ours = sum(len(processor.Encode(text)) for text in documents)
    theirs = sum(len(hf.encode(text).ids) for text in documents)
    assert ours <= 1.02 * theirs, (ours, theirs)
    assert processor.IdToPiece(268) == "".join(merges[0])  # the first merge is the best-scored piece


@pytest.mark.parametrize("backend", ["hf", "sentencepiece"])
def test_train_streaming_round_trips_and_exports(backend, small_corpus, tmp_path):
    tok = train_streaming(
        tmp_path / backend, small_corpus, vocab_size=1024, mix="ko=0.6,en=0.25,code=0.15", backend=backend,
        sample_chars=10_000_000, num_threads=1,
    )  # fmt: skip
    assert tok.vocab_size == 1024 and tok.metadata["settings"]["backend"] == backend
    assert tok.special_tokens["<|bos|>"] == 1 and tok.is_byte(12)
    reloaded = Tokenizer.load(tmp_path / backend)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / backend / "tokenizer.json"))
    for text in HARD:
        ids = reloaded.encode(text)
        assert reloaded.decode(ids) == text
        assert hf.encode(text).ids == ids, text


def test_train_streaming_bad_options(small_corpus, tmp_path):
    with pytest.raises(TokenizerError, match="--backend 'bpe-fast' is not one of"):
        train_streaming(tmp_path / "a", small_corpus, vocab_size=1024, mix="ko=1", backend="bpe-fast")
    with pytest.raises(TokenizerError, match="--sample-chars must be a positive integer"):
        train_streaming(tmp_path / "a", small_corpus, vocab_size=1024, mix="ko=1", sample_chars=0)
    with pytest.raises(TokenizerError, match="more than this corpus supports"):
        train_streaming(tmp_path / "a", small_corpus[:1], vocab_size=200_000, mix="ko=1", num_threads=1)
    with pytest.raises(TokenizerError, match="corpus file .*missing.jsonl does not exist"):
        train_streaming(tmp_path / "a", [tmp_path / "missing.jsonl"], vocab_size=1024, mix="ko=1")


def test_metadata_describes_a_built_corpus_without_machine_paths(small_corpus, tmp_path):
    corpus = tmp_path / "built"
    (corpus / "train").mkdir(parents=True)
    sources = []
    for path in small_corpus:
        name = f"{path.stem}_src"
        records = [json.loads(line) | {"source": f"{name}:doc{i}"} for i, line in enumerate(path.read_text().splitlines())]
        write_lines(corpus / "train" / f"{name}.jsonl", records)
        deb = {"package": f"pkg-{path.stem}", "deb": f"pkg-{path.stem}_1%3a2.0-1_all.deb", "sha256": "ab" * 32}
        sources.append({"name": name, "lang": path.stem, "domain": "d", "licence": "MIT", "packages": [deb]})
    sources.append({"name": "unused_src", "lang": "ko", "domain": "d", "licence": "MIT", "packages": []})
    (corpus / "manifest.json").write_text(json.dumps({"format": "kmodel-corpus/1", "heldout_rule": "r", "sources": sources}))
    tok = train_streaming(
        tmp_path / "tok", sorted((corpus / "train").glob("*.jsonl")), vocab_size=1024, mix="ko=0.6,en=0.25,code=0.15",
        sample_chars=10_000_000, num_threads=1,
    )  # fmt: skip
    metadata = json.loads((tmp_path / "tok" / "metadata.json").read_text(encoding="utf-8"))
    assert machine_paths(metadata) == []
    assert {entry["path"] for entry in metadata["corpus"]["files"]} == {f"train/{p.stem}_src.jsonl" for p in small_corpus}
    build = metadata["corpus"]["build"]
    assert [source["name"] for source in build["sources"]] == [f"{p.stem}_src" for p in small_corpus]  # not unused_src
    assert build["sources"][0]["packages"][0]["version"] == "1:2.0-1" and len(build["manifest_sha256"]) == 64
    assert "--input CORPUS/train/*.jsonl --out tok" in metadata["settings"]["command"]
    assert tok.metadata == metadata
