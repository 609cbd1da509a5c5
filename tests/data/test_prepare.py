"""`kmodel data prepare`: shard contents, the manifest, parallel workers, resuming after a kill, refusals;
and training on prepared data (the same rows however the shards are cut, nothing re-hashed at start)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kmodel.config import load_config
from kmodel.data import DataError, PreparedData, data_manifest, load_tokenizer, prepare, training_mixture
from kmodel.data.shards import DOCS_SUFFIX, MANIFEST_FILE, SHARDS_DIR, TOKENS_SUFFIX
from kmodel.hashing import sha256_file
from kmodel.safe_path import python_command

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny-ko-moe.yaml"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("shipped")


def corpus(tmp_path: Path, documents: int = 60) -> Path:
    """Two small sources (Korean and code) copied from the bundled corpus."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("ko_libreoffice_help.jsonl", "code_python_stdlib.jsonl"):
        lines = (REPO / "data/corpus/train" / name).read_text(encoding="utf-8").rstrip("\n").split("\n")[:documents]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def recipe(folder: Path, *extra: str):
    return load_config(RECIPE, [
        f"data.sources=[{{name: ko, path: {folder / 'ko_libreoffice_help.jsonl'}, weight: 3}}, "
        f"{{name: code, path: {folder / 'code_python_stdlib.jsonl'}}}]",
        "data.heldout=[]", "data.seq_len=32", *extra,
    ])


def test_shards_hold_every_document_tokenized_with_eos_and_the_manifest_pins_them(tmp_path, tokenizer):
    folder = corpus(tmp_path)
    cfg = recipe(folder)
    prepared = prepare(cfg.data, tmp_path / "out", part_bytes=20_000, progress=False)
    manifest = prepared.manifest
    assert manifest["tokenizer"] == {"sha256": tokenizer.fingerprint(), "vocab_size": 8192, "eos_id": tokenizer.eos_id}
    assert manifest["token_dtype"] == "<u2"
    ko = manifest["sources"][0]
    assert ko["name"] == "ko" and ko["weight"] == 3 and len(ko["shards"]) > 1
    path = folder / "ko_libreoffice_help.jsonl"
    assert ko["files"] == [{"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}]

    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").rstrip("\n").split("\n")]
    expected = [tokenizer.encode(t, add_eos=True) for t in texts]
    shards = tmp_path / "out" / SHARDS_DIR
    tokens = np.concatenate([np.fromfile(shards / f"{s['name']}{TOKENS_SUFFIX}", dtype="<u2") for s in ko["shards"]])
    assert tokens.tolist() == [i for ids in expected for i in ids]
    ends = [np.fromfile(shards / f"{s['name']}{DOCS_SUFFIX}", dtype="<i8") for s in ko["shards"]]
    assert [len(e) for e in ends] == [s["documents"] for s in ko["shards"]]
    assert sum(s["documents"] for s in ko["shards"]) == len(texts)
    for shard in ko["shards"]:
        assert sha256_file(shards / f"{shard['name']}{TOKENS_SUFFIX}") == shard["tokens_sha256"]
        assert shard["tokens"] * 2 == (shards / f"{shard['name']}{TOKENS_SUFFIX}").stat().st_size
    assert prepared.verify() == []
    assert manifest["merkle_root"] == data_manifest(cfg.data)["merkle_root"]  # the same root as the data manifest


def test_training_rows_do_not_depend_on_how_the_shards_are_cut(tmp_path, tokenizer):
    folder = corpus(tmp_path)
    batches = []
    for part_bytes in (7_000, 1 << 30):
        out = tmp_path / f"out-{part_bytes}"
        prepare(recipe(folder).data, out, part_bytes=part_bytes, progress=False)
        cfg = recipe(folder, f"data.prepared={out}")
        mixture = training_mixture(cfg, tokenizer, data_manifest(cfg.data), None)
        batches.append(mixture.next_batch(64).input_ids)
    np.testing.assert_array_equal(batches[0], batches[1])


def test_training_on_prepared_data_reads_only_the_prepared_directory(tmp_path, tokenizer):
    folder = corpus(tmp_path)
    prepare(recipe(folder).data, tmp_path / "out", progress=False)
    shutil.rmtree(folder)  # the sources are gone: nothing is re-hashed or re-read at start
    cfg = load_config(RECIPE, [f"data.prepared={tmp_path / 'out'}", "data.sources=[]", "data.heldout=[]", "data.seq_len=32"])
    manifest = data_manifest(cfg.data)
    assert [s["name"] for s in manifest["sources"]] == ["ko", "code"] and manifest["prepared"]["path"] == str(tmp_path / "out")
    mixture = training_mixture(cfg, tokenizer, manifest, None)
    assert mixture.next_batch(4).input_ids.shape == (4, 32)

    only_code = load_config(RECIPE, [f"data.prepared={tmp_path / 'out'}", "data.sources=[{name: code, path: gone}]",
                                     "data.heldout=[]", "data.seq_len=32"])
    assert [s["name"] for s in data_manifest(only_code.data)["sources"]] == ["code"]
    unknown = load_config(RECIPE, [f"data.prepared={tmp_path / 'out'}", "data.sources=[{name: web, path: x}]",
                                   "data.heldout=[]", "data.seq_len=32"])
    with pytest.raises(DataError, match=r"data.sources names 'web', which data.prepared .* does not hold \(it holds 'ko', 'code'\)"):
        data_manifest(unknown.data)


def test_a_prepared_directory_of_another_tokenizer_is_refused_naming_both_hashes(tmp_path, tokenizer):
    folder = corpus(tmp_path)
    out = tmp_path / "out"
    prepare(recipe(folder).data, out, progress=False)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    other = "ab" * 32
    manifest["tokenizer"]["sha256"] = other
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    cfg = recipe(folder, f"data.prepared={out}")
    with pytest.raises(DataError, match=rf"tokenized with tokenizer sha256 {other} \(vocab_size 8192\), but data.tokenizer "
                                        rf"'shipped' is sha256 {tokenizer.fingerprint()}"):
        training_mixture(cfg, tokenizer, data_manifest(cfg.data), None)


def test_a_damaged_prepared_directory_is_refused_naming_the_shard(tmp_path):
    folder = corpus(tmp_path)
    out = tmp_path / "out"
    prepared = prepare(recipe(folder).data, out, progress=False)
    shard = out / SHARDS_DIR / f"{prepared.sources[1]['shards'][0]['name']}{TOKENS_SUFFIX}"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(DataError, match=rf"shard {shard} is \d+ bytes, the manifest says \d+ bytes; prepare it again"):
        PreparedData(out)
    (out / MANIFEST_FILE).unlink()
    with pytest.raises(DataError, match=r"no manifest.json \(a prepare that was stopped: run `kmodel data prepare` again"):
        PreparedData(out)


def test_another_recipe_into_a_prepared_directory_is_refused(tmp_path):
    folder = corpus(tmp_path)
    prepare(recipe(folder).data, tmp_path / "out", progress=False)
    cfg = recipe(folder)
    cfg.data.sources[0].weight = 1
    prepare(cfg.data, tmp_path / "out", progress=False)  # other weights, the same data: already prepared
    cfg.data.sources[0].text_key = "body"
    with pytest.raises(DataError, match=r"already holds prepared data of other sources .*choose another --out"):
        prepare(cfg.data, tmp_path / "out", progress=False)


def test_bad_input_is_named_with_file_and_line(tmp_path):
    folder = corpus(tmp_path)
    path = folder / "code_python_stdlib.jsonl"
    lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    lines[30] = '{"text": "cut'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path} is corrupt: line 31 is not valid JSON"):
        prepare(recipe(folder).data, tmp_path / "out", part_bytes=5_000, progress=False)


@pytest.mark.distributed
def test_two_workers_make_the_same_shards_as_one(tmp_path):
    folder = corpus(tmp_path)
    one = prepare(recipe(folder).data, tmp_path / "one", part_bytes=10_000, progress=False)
    two = prepare(recipe(folder).data, tmp_path / "two", workers=2, part_bytes=10_000, progress=False)
    assert one.manifest == two.manifest

    lines = (folder / "ko_libreoffice_help.jsonl").read_text(encoding="utf-8").rstrip("\n").split("\n")
    lines[50] = '{"body": "no text"}'
    (folder / "ko_libreoffice_help.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ko_libreoffice_help\.jsonl line 51 has no 'text' key"):
        prepare(recipe(folder).data, tmp_path / "three", workers=2, part_bytes=10_000, progress=False)


@pytest.mark.distributed
def test_a_killed_prepare_resumes_keeping_its_complete_shards(tmp_path):
    folder = corpus(tmp_path)
    cfg_args = ["--set", f"data.sources=[{{name: ko, path: {folder / 'ko_libreoffice_help.jsonl'}, weight: 3}}, "
                         f"{{name: code, path: {folder / 'code_python_stdlib.jsonl'}}}]", "--part-mb", "0.01"]
    out = tmp_path / "out"
    command = [*python_command(str(HERE / "kill_prepare.py")), "2", "data", "prepare", str(RECIPE), "--out", str(out),
               *cfg_args, "--no-progress"]
    killed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr
    shards = out / SHARDS_DIR
    assert not (out / MANIFEST_FILE).exists()
    assert any(p.name.startswith(".") for p in shards.iterdir())  # the third shard was half written
    complete = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.json")}
    assert len(complete) == 2

    from kmodel.cli import main

    assert main(["data", "prepare", str(RECIPE), "--out", str(out), *cfg_args, "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.json") if p.name in complete} == complete
    assert not any(p.name.startswith(".") for p in shards.iterdir())
    reference = prepare(recipe(folder).data, tmp_path / "reference", part_bytes=int(0.01 * 2**20), progress=False)
    assert PreparedData(out).manifest == reference.manifest


def test_a_hub_source_is_streamed_and_hashed_by_content(tmp_path, monkeypatch, tokenizer):
    import datasets

    rows = [{"text": "허브 문서 하나"}, {"text": "hub document two"}]
    calls = []

    def fake_load_dataset(name, split, streaming=False):
        calls.append((name, split, streaming))
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = load_config(RECIPE, ["data.sources=[{name: web, path: someorg/korean-web}]", "data.heldout=[]"])
    prepared = prepare(cfg.data, tmp_path / "out", progress=False)
    assert calls == [("someorg/korean-web", "train", True)]  # streamed, never downloaded whole
    (entry,) = prepared.sources[0]["files"]
    assert entry["path"] == "hub:someorg/korean-web" and len(entry["sha256"]) == 64
    assert sum(s["tokens"] for s in prepared.sources[0]["shards"]) == sum(
        len(tokenizer.encode(r["text"], add_eos=True)) for r in rows)


def test_a_data_section_needs_sources_or_a_prepared_directory():
    from kmodel.config import ConfigError

    with pytest.raises(ConfigError, match=r"data: data.sources is empty: name at least one source, or data.prepared"):
        load_config(RECIPE, ["data.sources=[]"])
    assert load_config(RECIPE, ["data.sources=[]", "data.prepared=/somewhere"]).data.prepared == "/somewhere"
