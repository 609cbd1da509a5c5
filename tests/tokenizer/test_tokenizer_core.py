import hashlib
import json
import shutil
import unicodedata

import pytest
from kmodel.tokenizer import (
    SHIPPED_TOKENIZER,
    Tokenizer,
    TokenizerError,
    special_tokens,
)


def test_shipped_tokenizer_shape(shipped):
    assert SHIPPED_TOKENIZER.name == "ko-8k"
    assert shipped.vocab_size == 8192
    assert shipped.model_type == "bpe"
    assert shipped.special_tokens == {token: index for index, token in enumerate(special_tokens.ALL)}
    assert (shipped.bos_id, shipped.eos_id, shipped.pad_id) == (1, 2, 3)
    assert len({shipped.bos_id, shipped.eos_id, shipped.pad_id, shipped.unk_id}) == 4
    total_bytes = sum(path.stat().st_size for path in SHIPPED_TOKENIZER.iterdir())
    assert total_bytes < 2_000_000


def test_shipped_metadata_records_corpus_and_settings(shipped):
    metadata = shipped.metadata
    assert metadata["settings"]["vocab_size"] == 8192
    assert metadata["settings"]["byte_fallback"] and metadata["settings"]["split_digits"]
    assert metadata["normalization"] == "NFC"
    files = metadata["corpus"]["files"]
    assert {f["path"] for f in files} == {
        "data/corpus/train/code_python_stdlib.jsonl",
        "data/corpus/train/en_python_docs.jsonl",
        "data/corpus/train/ko_libreoffice_help.jsonl",
    }
    assert all(len(f["sha256"]) == 64 for f in files)
    assert set(metadata["corpus"]["sample"]["characters_by_lang"]) == {"ko", "en", "code"}


def test_fingerprint_is_sha256_of_model(shipped):
    model = SHIPPED_TOKENIZER / "tokenizer.model"
    assert shipped.fingerprint() == hashlib.sha256(model.read_bytes()).hexdigest()


def test_encode_korean_english_code(shipped):
    text = "대화 상자에서 콘트롤 속성을 변경합니다. The dialog opens.\n    return x + 1\n"
    ids = shipped.encode(text)
    assert shipped.decode(ids) == text
    # Korean help text compresses to well under one token per character.
    korean = "대화 상자에서 콘트롤 속성을 변경할 수 있습니다."
    assert len(shipped.encode(korean)) < len(korean) / 2


def test_bos_eos(shipped):
    ids = shipped.encode("안녕", add_bos=True, add_eos=True)
    assert ids[0] == shipped.bos_id and ids[-1] == shipped.eos_id
    assert ids[1:-1] == shipped.encode("안녕")
    assert shipped.decode(ids, skip_special_tokens=True) == "안녕"


def test_encode_normalises_to_nfc(shipped):
    decomposed = unicodedata.normalize("NFD", "한국어 텍스트")
    assert decomposed != "한국어 텍스트"
    assert shipped.encode(decomposed) == shipped.encode("한국어 텍스트")


@pytest.mark.parametrize("text", ["ㅋㅋㅋ", "㈜카카오", "①②③", "ＡＢＣ", "ﬁ"])
def test_compatibility_characters_survive(shipped, text):
    # NFKC would rewrite all of these; NFC must keep them.
    assert shipped.decode(shipped.encode(text)) == text


def test_digits_are_split(shipped):
    pieces = [shipped.id_to_piece(index) for index in shipped.encode("2024년 12345")]
    digits = [piece for piece in pieces if any(c.isdigit() for c in piece)]
    assert digits == list("202412345")


def test_whitespace_is_preserved_and_indentation_is_cheap(shipped):
    code = "def f(x):\n        if x:\n            return  x\n\t\tpass  \n"
    ids = shipped.encode(code)
    assert shipped.decode(ids) == code
    assert "▁" * 8 in {shipped.id_to_piece(index) for index in ids}


def test_special_token_text_maps_to_special_id(shipped):
    ids = shipped.encode("<|user|>안녕<|end|>")
    assert ids[0] == shipped.special_tokens["<|user|>"]
    assert ids[-1] == shipped.special_tokens["<|end|>"]
    assert shipped.decode(ids) == "<|user|>안녕<|end|>"


def test_literal_space_symbol_survives(shipped):
    text = "a\u2581b \u2581"
    assert shipped.decode(shipped.encode(text)) == text
    assert shipped.encode_batch([text, "a b"]) == [shipped.encode(text), shipped.encode("a b")]


def test_encode_batch_matches_encode(shipped, heldout_documents):
    texts = [record["text"] for record in heldout_documents[:30]] + ["", "x"]
    assert shipped.encode_batch(texts, add_bos=True) == [shipped.encode(t, add_bos=True) for t in texts]


def test_rare_characters_fall_back_to_bytes(shipped):
    ids = shipped.encode("𓀀")  # Egyptian hieroglyph: 4 UTF-8 bytes, never in training
    assert len(ids) == 4 and all(shipped.is_byte(index) for index in ids)
    assert shipped.unk_id not in ids


def test_type_and_range_errors(shipped):
    with pytest.raises(TypeError, match="expects a str"):
        shipped.encode(b"bytes")
    with pytest.raises(TypeError, match="single str"):
        shipped.encode_batch("not a list")
    with pytest.raises(TokenizerError, match="token id 9999 is out of range"):
        shipped.decode([5, 9999])


def test_save_and_reload(shipped, tmp_path):
    target = shipped.save(tmp_path / "ckpt" / "tokenizer")
    assert {p.name for p in target.iterdir()} == {"tokenizer.model", "metadata.json", "tokenizer.json"}
    reloaded = Tokenizer.load(target)
    assert reloaded.fingerprint() == shipped.fingerprint()
    assert reloaded.encode("저장 후 다시 읽기") == shipped.encode("저장 후 다시 읽기")
    assert json.loads((target / "tokenizer.json").read_text()) == json.loads(
        (SHIPPED_TOKENIZER / "tokenizer.json").read_text()
    )


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        Tokenizer.load(missing)

    copy = tmp_path / "copy"
    shutil.copytree(SHIPPED_TOKENIZER, copy)
    (copy / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"copy/tokenizer.model .*does not exist"):
        Tokenizer.load(copy)

    tampered = tmp_path / "tampered"
    shutil.copytree(SHIPPED_TOKENIZER, tampered)
    metadata = json.loads((tampered / "metadata.json").read_text())
    metadata["model_sha256"] = "0" * 64
    (tampered / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(TokenizerError, match=r"tampered/tokenizer.model does not match .*metadata.json"):
        Tokenizer.load(tampered)

    wrong_ids = tmp_path / "wrong_ids"
    shutil.copytree(SHIPPED_TOKENIZER, wrong_ids)
    metadata = json.loads((wrong_ids / "metadata.json").read_text())
    metadata["special_tokens"]["<|eos|>"] = 7
    (wrong_ids / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(TokenizerError, match=r"special token '<\|eos\|>' is not id 7"):
        Tokenizer.load(wrong_ids)

    wrong_size = tmp_path / "wrong_size"
    shutil.copytree(SHIPPED_TOKENIZER, wrong_size)
    metadata = json.loads((wrong_size / "metadata.json").read_text())
    metadata["vocab_size"] = 100
    (wrong_size / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(TokenizerError, match=r"tokenizer.model has 8192 pieces but .*records vocab_size 100"):
        Tokenizer.load(wrong_size)

    broken = tmp_path / "broken"
    shutil.copytree(SHIPPED_TOKENIZER, broken)
    (broken / "metadata.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"broken/metadata.json is not valid JSON"):
        Tokenizer.load(broken)
