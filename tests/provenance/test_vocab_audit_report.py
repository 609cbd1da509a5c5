"""Tokenizer comparison, the code audit, the HTML report and the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kmodel.tokenizer import SHIPPED_TOKENIZER

from kmodel.cli import main
from kmodel.provenance.audit import (
    FAIL,
    INFO,
    PASS,
    WARN,
    classify_runtime,
    dependency_findings,
    static_audit,
)
from kmodel.provenance.report import loss_svg, render_report
from kmodel.provenance.verify import verify_run
from kmodel.provenance.vocab import (
    VocabError,
    compare_vocabs,
    load_vocab,
    shared_token_ids,
)


def write_bpe(path: Path, tokens: list[str], merges: list[list[str]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    data = {"model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
            "added_tokens": [{"id": 0, "content": tokens[0]}]}
    (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return path


# --- tokenizers ----------------------------------------------------------------------------------------


def test_shipped_tokenizer_is_identical_to_itself_in_both_formats():
    from_json = load_vocab(SHIPPED_TOKENIZER / "tokenizer.json")
    from_sentencepiece = load_vocab(SHIPPED_TOKENIZER / "tokenizer.model")
    assert from_json.size == from_sentencepiece.size == 8192
    result = compare_vocabs(from_json, load_vocab(SHIPPED_TOKENIZER))
    assert result["relation"] == "identical" and result["same_id_fraction"] == 1.0
    assert compare_vocabs(from_json, from_sentencepiece)["shared_tokens"] > 8000


def test_extended_vocabulary_is_recognised(tmp_path):
    base = ["<unk>", "a", "b", "ab", "c", "abc"]
    merges = [["a", "b"], ["ab", "c"]]
    a = load_vocab(write_bpe(tmp_path / "a", base, merges))
    b = load_vocab(write_bpe(tmp_path / "b", base + ["한", "국", "한국"], merges + [["한", "국"]]))
    result = compare_vocabs(a, b)
    assert result["relation"] == "B extends A"
    assert result["common_id_prefix"] == 6 and result["common_merge_prefix"] == 2
    assert compare_vocabs(b, a)["relation"] == "A extends B"
    assert result["shared_fraction_of_a"] == 1.0 and result["jaccard"] == pytest.approx(6 / 9)


def test_reordered_and_disjoint_vocabularies(tmp_path):
    a = load_vocab(write_bpe(tmp_path / "a", ["<unk>", "x", "y", "z"], []))
    shuffled = load_vocab(write_bpe(tmp_path / "b", ["<unk>", "z", "x", "y"], []))
    result = compare_vocabs(a, shuffled)
    assert result["relation"] == "different" and result["shared_tokens"] == 4 and result["same_id_fraction"] == 0.25
    ids_a, ids_b = shared_token_ids(a, shuffled)
    assert [a.tokens[int(i)] for i in ids_a] == [shuffled.tokens[int(i)] for i in ids_b]
    other = load_vocab(write_bpe(tmp_path / "c", ["q", "r"], []))
    assert compare_vocabs(a, other)["relation"] == "disjoint"
    with pytest.raises(VocabError, match="no tokenizer at"):
        load_vocab(tmp_path / "nothing")


# --- audit ---------------------------------------------------------------------------------------------


def fake_tree(root: Path, trainer_source: str) -> Path:
    for folder in ("kmodel/train", "kmodel/model", "kernels", "tokenizer"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").write_text("")
    (root / "kmodel" / "__init__.py").write_text("")
    (root / "kmodel" / "train" / "trainer.py").write_text(trainer_source)
    (root / "kmodel" / "model" / "helper.py").write_text("import timm\n")
    return root


def test_audit_flags_model_code_on_the_training_path(tmp_path):
    root = fake_tree(tmp_path, "from ..model import helper\nfrom transformers import AutoModel\n\n"
                     "def build():\n    return AutoModel.from_pretrained('someone/else')\n")
    findings = static_audit(root)
    failed = {(f.where, f.kind) for f in findings if f.status == FAIL}
    assert ("kmodel/train/trainer.py:2", "import") in failed
    assert ("kmodel/train/trainer.py:5", "weight-load") in failed
    assert ("kmodel/model/helper.py:1", "import") in failed  # reached through the relative import
    (root / "kmodel" / "train" / "trainer.py").write_text("import torch\n")
    findings = static_audit(root)
    assert [f.status for f in findings if f.where == "kmodel/model/helper.py:1"] == [WARN]  # no longer reachable


def test_audit_of_this_checkout_finds_no_model_code_on_the_training_path():
    findings = static_audit() + dependency_findings()
    assert not [f for f in findings if f.status == FAIL], [f for f in findings if f.status == FAIL]
    checkpoint_reads = [f for f in findings if f.kind == "weight-load" and f.where.startswith("kmodel/checkpoint/")]
    assert len(checkpoint_reads) == 4 and all(f.status == PASS for f in checkpoint_reads), checkpoint_reads


def test_runtime_findings_separate_run_files_cache_and_outside_weights(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache" / "tokens"
    probe = {
        "opened": [str(run_dir / "checkpoints/step_0000002/model.safetensors"), str(cache / "k/shards/s0.tokens"),
                   str(cache / "k/shards/s0.docs"), str(cache / "k.npz"),
                   "/elsewhere/pretrained/model.safetensors", "/usr/lib/python3/os.py"],
        "imported": ["kmodel.train", "transformers.models.llama"],
    }
    findings = classify_runtime(probe, run_dir, cache)
    status = {f.where: f.status for f in findings}
    assert status[str(run_dir / "checkpoints/step_0000002/model.safetensors")] == PASS
    assert status[str(cache / "k/shards/s0.tokens")] == status[str(cache / "k/shards/s0.docs")] == INFO
    assert status[str(cache / "k.npz")] == FAIL  # the cache holds token shards only: a weight-like file there is not data
    assert status["/elsewhere/pretrained/model.safetensors"] == FAIL
    assert status["transformers.models.llama"] == FAIL
    assert "/usr/lib/python3/os.py" not in status


@pytest.mark.slow
def test_runtime_audit_of_a_real_run():
    from provenance_helpers import RECIPE, SMALL_MODEL

    from kmodel.provenance.audit import runtime_audit

    findings = runtime_audit(str(RECIPE), SMALL_MODEL + ["data.seq_len=32", "train.micro_batch_size=2", "train.device=cpu"])
    assert not [f for f in findings if f.status == FAIL]
    assert any(f.status == PASS and f.where.endswith("model.safetensors") for f in findings)


# --- report and command line -------------------------------------------------------------------------


def test_report_is_one_self_contained_page(trained_run):
    run_dir, data_root = trained_run
    page = render_report(run_dir, checks=verify_run(run_dir, data_root=data_root),
                         replays=[{"from_step": 2, "device": "cpu", "checkpoints": [
                             {"step": 4, "passed": True, "matches": {"loss": True}, "weight_distance": 0.0}]}])
    assert "verification passed" in page and "<polyline" in page and "Replays" in page
    assert "<script" not in page and not re.search(r"(src|href)=['\"]?https?:", page)
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert all(record["hash"] in page for record in ledger)
    assert page.count("<circle") == 3  # the three recorded checkpoints on the loss curve


def test_loss_svg_scales_points_into_the_frame():
    svg = loss_svg([(1, 5.0), (2, 4.0), (3, 3.5)], [(2, 4.0)], width=300, height=200)
    xs = [float(v) for v in re.findall(r"cx='([\d.]+)'", svg)]
    assert xs == [150.0]  # step 2 is the middle of 1..3
    assert loss_svg([], []) == "<p>No losses were logged.</p>"


def test_cli_verify_report_compare_and_exit_codes(run_copy, tmp_path, capsys):
    run_dir, data_root = run_copy
    assert main(["provenance", "verify", str(run_dir), "--skip-init", "--data-root", str(data_root)]) == 0
    assert main(["provenance", "report", str(run_dir), "--out", str(tmp_path / "r.html"), "--skip-init",
                 "--data-root", str(data_root)]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    capsys.readouterr()
    ckpts = run_dir / "checkpoints"
    assert main(["provenance", "compare", str(ckpts / "step_0000002"), str(ckpts / "step_0000006"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["derived"] and report["tokenizers"]["relation"] == "identical"
    (ckpts / "step_0000004" / "state.pt").write_bytes(b"not a checkpoint")
    assert main(["provenance", "verify", str(run_dir), "--skip-init", "--skip-data", "--json"]) == 1
    checks = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in checks if c["status"] == "fail"] == ["checkpoint 4"]
    assert main(["provenance", "replay", str(run_dir), "--from", "3"]) == 1
    assert "step 3 is not a recorded checkpoint" in capsys.readouterr().err
    assert main(["provenance", "compare", str(tmp_path / "nope"), str(ckpts / "step_0000002")]) == 2
    assert "nope is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["verify", "replay", "compare", "audit", "report", "sign", "keygen"])
def test_every_subcommand_explains_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["provenance", command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1].strip("\n"))
    assert len(entries) >= 2  # -h and at least one option of the command's own
    for entry in entries:
        flags, _, explanation = entry.strip().partition("  ")
        assert explanation.strip(), f"{command}: {flags} has no explanation"
