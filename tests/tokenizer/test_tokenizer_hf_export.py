import json

import pytest
from kmodel.tokenizer import train_tokenizer
from kmodel.tokenizer.hf_export import export_hf_tokenizer

tokenizers = pytest.importorskip("tokenizers")

TRICKY = [
    "",
    " ",
    "   leading and trailing   ",
    "<|user|>안녕하세요<|end|><|assistant|>",
    "literal <unk> <0x41> <s> </s> text",
    "ㅋㅋㅋ ㈜ ① ＡＢＣ 👩‍💻 𓀀",
    "def f(x):\n\tif x:\n        return 12345\n",
    "\r\n\r\n\u3000\u00a0끝",
]


@pytest.fixture(scope="module")
def exported(shipped, tmp_path_factory):
    return export_hf_tokenizer(shipped, tmp_path_factory.mktemp("hf"))


def test_export_writes_the_transformers_files(exported, shipped):
    assert {p.name for p in exported.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|bos|>" and config["eos_token"] == "<|eos|>" and config["pad_token"] == "<|pad|>"
    assert config["kmodel_tokenizer_sha256"] == shipped.fingerprint()


def test_tokenizers_library_gives_identical_ids(exported, shipped, heldout_documents):
    hf = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
    assert hf.get_vocab_size() == shipped.vocab_size
    for text in [record["text"] for record in heldout_documents] + TRICKY:
        ids = shipped.encode(text)
        assert hf.encode(text).ids == ids, text[:80]
        assert hf.decode(ids, skip_special_tokens=False) == shipped.decode(ids)


def test_transformers_fast_tokenizer_gives_identical_ids(exported, shipped, heldout_documents):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(exported))
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (shipped.bos_id, shipped.eos_id, shipped.pad_id)
    texts = [record["text"] for record in heldout_documents[::5]] + TRICKY
    for text in texts:
        assert fast.encode(text) == shipped.encode(text), text[:80]
    assert fast.decode(shipped.encode("대화 상자"), skip_special_tokens=True) == "대화 상자"


def test_unigram_export_gives_identical_ids(small_corpus, tmp_path, heldout_documents):
    tok = train_tokenizer(tmp_path / "uni", vocab_size=1200, inputs=small_corpus, model_type="unigram", num_threads=1)
    hf = tokenizers.Tokenizer.from_file(str(export_hf_tokenizer(tok, tmp_path / "hf") / "tokenizer.json"))
    for text in [record["text"] for record in heldout_documents[::4]] + TRICKY:
        assert hf.encode(text).ids == tok.encode(text), text[:80]
