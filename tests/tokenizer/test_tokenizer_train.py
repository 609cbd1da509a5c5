import hashlib
import json

import pytest
from kmodel.tokenizer import Tokenizer, TokenizerError, train_tokenizer
from kmodel.tokenizer.corpus import draw_sample, parse_mix, read_corpus_file
from kmodel.tokenizer.train import trainer_sentences

SMALL_VOCAB = 1200


@pytest.fixture(scope="module")
def small_bpe(small_corpus, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(tmp_path_factory.mktemp("bpe"), vocab_size=SMALL_VOCAB, inputs=small_corpus, num_threads=1)


def test_training_writes_a_loadable_tokenizer(small_bpe, small_corpus):
    directory = small_bpe.directory
    assert {p.name for p in directory.iterdir()} == {"tokenizer.model", "metadata.json", "tokenizer.json"}
    assert small_bpe.vocab_size == SMALL_VOCAB
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["special_tokens"]["<|bos|>"] == small_bpe.bos_id == 1
    recorded = {entry["sha256"] for entry in metadata["corpus"]["files"]}
    assert recorded == {hashlib.sha256(path.read_bytes()).hexdigest() for path in small_corpus}
    assert metadata["settings"]["mix"] == {"ko": 0.6, "en": 0.25, "code": 0.15}
    text = "대화 상자를 엽니다. Open the dialog.\n    return 42\n"
    assert small_bpe.decode(small_bpe.encode(text)) == text


def test_sample_follows_the_mix(small_corpus):
    files = [read_corpus_file(path) for path in small_corpus]
    sample = draw_sample(files, parse_mix("ko=0.5,en=0.3,code=0.2"), seed=1)
    shares = {lang: chars / sample.characters for lang, chars in sample.characters_by_lang.items()}
    # Whole documents are drawn, so each share may overshoot by at most one document.
    longest = max(len(d.text) for f in files for d in f.documents) / sample.characters
    for lang, weight in {"ko": 0.5, "en": 0.3, "code": 0.2}.items():
        assert weight - longest <= shares[lang] <= weight + longest
    assert draw_sample(files, parse_mix("ko=0.5,en=0.3,code=0.2"), seed=1).sha256 == sample.sha256


def test_languages_left_out_of_the_mix_are_excluded(small_corpus):
    files = [read_corpus_file(path) for path in small_corpus]
    sample = draw_sample(files, parse_mix("ko=1"))
    assert set(sample.characters_by_lang) == {"ko"}
    assert sample.excluded_by_lang == {"code": 2, "en": 4}


def test_trainer_sentences_keep_text_and_respect_the_byte_limit():
    text = "첫 줄\n" + "가" * 50 + "\n" + "short\n" * 20
    chunks = list(trainer_sentences([text], max_bytes=40))
    assert "".join(chunks) == text
    assert all(len(chunk.encode("utf-8")) <= 40 for chunk in chunks)


def test_unigram_option(small_corpus, tmp_path):
    tok = train_tokenizer(tmp_path, vocab_size=SMALL_VOCAB, inputs=small_corpus, model_type="unigram", num_threads=1)
    assert tok.model_type == "unigram" and tok.vocab_size == SMALL_VOCAB
    text = "콘트롤 속성 ㈜ 👩‍💻 <0x41> <unk>"
    assert tok.decode(tok.encode(text)) == text


def test_morpheme_aware_option(small_corpus, tmp_path):
    pytest.importorskip("kiwipiepy")
    options = {"vocab_size": SMALL_VOCAB, "inputs": small_corpus[:1], "mix": "ko=1", "num_threads": 1}
    plain = train_tokenizer(tmp_path / "plain", **options)
    aware = train_tokenizer(tmp_path / "aware", morpheme_aware=True, **options)
    assert aware.metadata["settings"]["morpheme_aware"] is True
    plain_pieces = {plain.id_to_piece(index) for index in range(plain.vocab_size)}
    aware_pieces = {aware.id_to_piece(index) for index in range(aware.vocab_size)}
    # The analyser splits 속성을 into 속성 + 을: plain BPE learns the whole eojeol, morpheme-aware BPE does not.
    assert "▁속성을" in plain_pieces
    assert "▁속성" in aware_pieces and "▁속성을" not in aware_pieces
    assert aware.decode(aware.encode("속성을 변경합니다")) == "속성을 변경합니다"


# Bad input: every error names its culprit.


def test_missing_input_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"corpus file .*absent.jsonl does not exist"):
        train_tokenizer(tmp_path / "out", inputs=[tmp_path / "absent.jsonl"])


def test_empty_corpus(tmp_path, make_jsonl):
    empty = make_jsonl("empty.jsonl", [{"text": "", "lang": "ko"}])
    with pytest.raises(TokenizerError, match=r"training corpus is empty.*empty.jsonl"):
        train_tokenizer(tmp_path / "out", inputs=[empty], mix="ko=1")


def test_unknown_mix_language(small_corpus, tmp_path):
    with pytest.raises(
        TokenizerError,
        match=r"--mix asks for language\(s\) 'ja' but the input has none \(languages present: code, en, ko",
    ):
        train_tokenizer(tmp_path / "out", inputs=small_corpus, mix="ko=0.5,ja=0.5")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ko", r"--mix entry 'ko' is not of the form lang=weight"),
        ("ko=abc", r"--mix weight for 'ko' is not a number: 'abc'"),
        ("ko=-1", r"--mix weight for 'ko' must be a non-negative number"),
        ("ko=0.5,ko=0.5", r"--mix names language 'ko' twice"),
        ("ko=0", r"--mix weights sum to zero"),
    ],
)
def test_bad_mix_spec(spec, message):
    with pytest.raises(TokenizerError, match=message):
        parse_mix(spec)


def test_vocab_larger_than_the_corpus_supports(small_corpus, tmp_path):
    with pytest.raises(
        TokenizerError,
        match=r"--vocab-size 60000 is more than this corpus supports for a bpe model: at most \d+ pieces",
    ):
        train_tokenizer(tmp_path / "out", vocab_size=60000, inputs=small_corpus, num_threads=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vocab_size", [100, 300_000])
def test_vocab_outside_supported_range(tmp_path, vocab_size):
    with pytest.raises(TokenizerError, match=rf"--vocab-size {vocab_size} is outside the supported range"):
        train_tokenizer(tmp_path / "out", vocab_size=vocab_size)


def test_vocab_too_small_for_the_alphabet(small_corpus, tmp_path):
    with pytest.raises(
        TokenizerError,
        match=r"--vocab-size 300 is too small: at character coverage 1.0 the alphabet and the special pieces alone need \d+ ids",
    ):
        train_tokenizer(tmp_path / "out", vocab_size=300, inputs=small_corpus, character_coverage=1.0, num_threads=1)


def test_bad_options(tmp_path):
    with pytest.raises(TokenizerError, match=r"--model-type 'wordpiece' is not one of bpe, unigram"):
        train_tokenizer(tmp_path, model_type="wordpiece")
    with pytest.raises(TokenizerError, match=r"--character-coverage 1.5 must lie in"):
        train_tokenizer(tmp_path, character_coverage=1.5)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "broken', r"bad.jsonl:2: not valid JSON"),
        ('["text", "ko"]', r"bad.jsonl:2: expected a JSON object"),
        ('{"text": "x"}', r"bad.jsonl:2: key 'lang' must be a string, it is missing"),
        ('{"text": 3, "lang": "ko"}', r"bad.jsonl:2: key 'text' must be a string, it is a int"),
        ('{"text": "x", "lang": ""}', r"bad.jsonl:2: key 'lang' is empty"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "좋은 줄", "lang": "ko"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=message):
        read_corpus_file(bad)


def test_skip_invalid_lines_reports_and_records_them(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "좋은 줄", "lang": "ko"}\n{"text": "broken\n{"text": "또 좋은 줄", "lang": "ko"}\n', encoding="utf-8"
    )
    corpus_file = read_corpus_file(bad, skip_invalid_lines=True)
    assert [d.text for d in corpus_file.documents] == ["좋은 줄", "또 좋은 줄"]
    assert [entry["line"] for entry in corpus_file.skipped_lines] == [2]
    assert corpus_file.describe()["skipped_lines"][0]["reason"].startswith("not valid JSON")


def test_plain_text_input_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("한 줄\n두 줄\n", encoding="utf-8")
    corpus_file = read_corpus_file(path)
    assert [(d.text, d.lang) for d in corpus_file.documents] == [("한 줄\n두 줄\n", "text")]
