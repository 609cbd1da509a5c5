"""The production tokenizer: what it was trained on, and that the recipes pointing at it can use it."""

import json

import pytest
import yaml
from conftest import machine_paths
from kmodel.tokenizer import PRODUCTION_TOKENIZER, SHIPPED_TOKENIZER, Tokenizer
from kmodel.tokenizer.corpus import REPO_ROOT
from kmodel.tokenizer.corpus_build import SOURCES


@pytest.fixture(scope="module")
def production():
    return Tokenizer.load(PRODUCTION_TOKENIZER)


def test_production_tokenizer_never_saw_the_unseen_domains(production):
    trained_on = {entry["path"].rsplit("/", 1)[-1].removesuffix(".jsonl") for entry in production.metadata["corpus"]["files"]}
    unseen = {source.name for source in SOURCES if source.unseen}
    assert unseen and not (trained_on & unseen)
    # Every training file it names is a builder source whose training part was non-empty.
    assert trained_on <= {source.name for source in SOURCES}
    settings = production.metadata["settings"]
    assert (settings["backend"], settings["vocab_size"], production.vocab_size) == ("hf", 131072, 131072)


def test_recipes_pointing_at_a_tokenizer_directory_fit_its_vocabulary():
    checked = 0
    for recipe in sorted((REPO_ROOT / "recipes").glob("*.yaml")):
        config = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        spec = (config.get("data") or {}).get("tokenizer", "shipped")
        if spec == "shipped":
            continue
        tok = Tokenizer.load(REPO_ROOT / spec)
        assert tok.vocab_size <= config["model"]["vocab_size"], f"{recipe.name}: {spec} does not fit the embedding"
        checked += 1
    assert checked >= 2  # the full-scale multi-node recipes


def test_korean_eojeol_are_single_tokens(production):
    for word in ("대한민국", " 있습니다", " 설정합니다", " 데이터베이스"):
        assert len(production.encode(word)) == 1, word
    assert json.loads((PRODUCTION_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] == "BPE"


@pytest.mark.parametrize("directory", [SHIPPED_TOKENIZER, PRODUCTION_TOKENIZER], ids=lambda path: path.name)
def test_shipped_metadata_names_no_machine_paths(directory):
    metadata = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
    assert machine_paths(metadata) == []


def test_production_metadata_says_how_to_rebuild_it(production):
    corpus = production.metadata["corpus"]
    build = corpus["build"]
    assert build["command"].startswith("kmodel tokenizer build-corpus") and len(build["manifest_sha256"]) == 64
    assert [source["name"] for source in build["sources"]] == sorted(corpus["sample"]["sources"], key=[s.name for s in SOURCES].index)
    for source in build["sources"]:
        assert source["licence"] and source["packages"], source["name"]
        assert all(package["version"] and len(package["deb_sha256"]) == 64 for package in source["packages"])
    assert production.metadata["settings"]["command"].endswith("--input CORPUS/train/*.jsonl --out tokenizer/shipped/ko-128k")
