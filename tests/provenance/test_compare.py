"""The derivation test on tiny trained models: unrelated pairs pass, every derived pair is flagged and the
copied module located; the statistics underneath are checked on their own."""

from __future__ import annotations

import math

import pytest
import torch

from kmodel.checkpoint import save_checkpoint
from kmodel.model import build_model
from kmodel.provenance import stats
from kmodel.provenance.calibrate import (
    COPIED_MODULES,
    DERIVED_CASES,
    derived_model,
    disguise,
    null_pairs,
    run,
    tiny_config,
    trained_model,
    view_of,
)
from kmodel.provenance.compare import compare, compare_views
from kmodel.provenance.views import ViewError, load_view

STEPS = 10  # at lr 3e-3 AdamW moves every weight by about its initial scale


@pytest.fixture(scope="module")
def model_a():
    return trained_model(7, STEPS)


def most_significant(report: dict) -> str:
    return min(report["modules"], key=lambda m: m["log10_p"])["module"]


def test_disguise_keeps_the_function():
    cfg = tiny_config(3)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        disguise(model, cfg, seed=11)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert not torch.equal(model.state_dict()["layers.1.mlp.experts.down_proj"], build_model(cfg).state_dict()["layers.1.mlp.experts.down_proj"])


def test_independent_models_are_not_flagged(model_a):
    cfg_a, a = model_a
    cfg_b, b = trained_model(8, STEPS)
    report = compare_views(view_of(a, cfg_a, "A"), view_of(b, cfg_b, "B"))
    assert not report["derived"] and report["shared_modules"] == []
    assert report["p_value"] > 1e-6
    assert report["modules_tested"] == 20  # embedding, LM head, and every module of 4 layers + MTP


@pytest.mark.parametrize("case", sorted(DERIVED_CASES))
def test_derived_models_are_flagged(model_a, case):
    cfg_a, a = model_a
    cfg_b, b = derived_model(case, cfg_a, a, seed=31, steps=STEPS)
    report = compare_views(view_of(a, cfg_a, "A"), view_of(b, cfg_b, "B"))
    assert report["derived"], report
    assert report["log10_p"] < -10
    if case in COPIED_MODULES:
        assert COPIED_MODULES[case] <= set(report["shared_modules"])
        assert most_significant(report) in COPIED_MODULES[case]
        # what the copier trained from its own seed is not reported as shared
        assert not {"layers.0.attention", "layers.1.mlp.experts"} & set(report["shared_modules"])
    else:
        layer_modules = {m["module"] for m in report["modules"] if m["kind"] != "embedding"}
        assert layer_modules <= set(report["shared_modules"])
    if case.startswith("disguised"):
        assert "embed" in report["alignments"]  # the permuted residual stream had to be recovered
    elif case not in COPIED_MODULES:
        assert {"embed", "lm_head"} <= set(report["shared_modules"])


def test_checkpoint_directory_against_its_hugging_face_export(tmp_path):
    from kmodel.tokenizer import SHIPPED_TOKENIZER, Tokenizer

    from kmodel.export.hf import export_hf

    cfg = tiny_config(4, ["model.vocab_size=8192"])  # the shipped tokenizer's size
    save_checkpoint(tmp_path / "ckpt", build_model(cfg), cfg, tokenizer=Tokenizer.load(SHIPPED_TOKENIZER))
    export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="float32")
    view = load_view(tmp_path / "hf")
    assert view.format == "hf" and view.layers["layers.1"].experts.gate.shape == (8, 48, 64)
    report = compare(tmp_path / "ckpt", tmp_path / "hf")
    assert report["derived"] and report["tokenizers"]["relation"] == "identical"
    assert {m["module"] for m in report["modules"]} >= {"embed", "lm_head", "layers.3.mlp.router"}
    other = tmp_path / "other"
    other_cfg = tiny_config(5, ["model.vocab_size=8192"])
    save_checkpoint(other, build_model(other_cfg), other_cfg)
    unrelated = compare(other, tmp_path / "hf")
    assert not unrelated["derived"]
    assert any("tokenizers not available" in note or "no tokenizer" in note for note in unrelated["notes"])


def test_bad_inputs_name_the_culprit(tmp_path):
    with pytest.raises(ViewError, match="is not a directory"):
        load_view(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ViewError, match=r"empty has neither model.safetensors"):
        load_view(tmp_path / "empty")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ViewError, match=r"hf has config.json but no \*.safetensors"):
        load_view(tmp_path / "hf")


# --- the statistics ------------------------------------------------------------------------------------


def test_pairing_p_values_are_uniform_for_unrelated_scores():
    generator = torch.Generator().manual_seed(0)
    small, large = [], []
    for _ in range(400):
        pairs = torch.randperm(6, generator=generator).numpy()
        small.append(math.exp(stats.pairing_log_p(torch.rand(6, 6, generator=generator), pairs)[1]))
        pairs = torch.randperm(40, generator=generator).numpy()
        large.append(math.exp(stats.pairing_log_p(torch.randn(40, 40, generator=generator), pairs)[1]))
    for values in (small, large):
        below = sum(p < 0.1 for p in values) / len(values)
        assert 0.06 < below < 0.14  # uniform: 10 % below 0.1
        assert 0.4 < sum(values) / len(values) < 0.6


def test_pairing_p_value_exact_and_extreme():
    scores = torch.eye(5) + 0.01 * torch.rand(5, 5, generator=torch.Generator().manual_seed(1))
    z, log_p = stats.pairing_log_p(scores, torch.arange(5).numpy())
    assert log_p == pytest.approx(-math.log(120))  # the best of 5! pairings, found exactly
    z, log_p = stats.pairing_log_p(torch.eye(200) * 3 + torch.rand(200, 200), torch.arange(200).numpy())
    assert z > 50 and stats.log10(log_p) < -500  # far beyond float underflow, still ranked


def test_fisher_matches_the_chi_square_tail():
    scipy_stats = pytest.importorskip("scipy.stats")
    p_values = [0.2, 0.03, 0.6, 0.01]
    expected = scipy_stats.combine_pvalues(p_values, method="fisher").pvalue
    assert math.exp(stats.fisher_log_p([math.log(p) for p in p_values])) == pytest.approx(expected, rel=1e-9)
    assert stats.fisher_log_p([0.0, 0.0]) == 0.0
    assert stats.fisher_log_p([-2000.0, 0.0]) < -1990


def test_matching_recovers_a_permutation():
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(30, 16, generator=generator)
    order = torch.randperm(30, generator=generator)
    pairs = stats.match_units(stats.abs_cosine(rows, -3.0 * rows[order]))
    assert (order[pairs] == torch.arange(30)).all()


@pytest.mark.slow
def test_calibration_on_many_seeds():
    summary = run(models=8, pair_limit=None, derived_repeats=1, steps=40, alpha=1e-6, log=lambda _: None)
    assert summary["null_pairs"] == 28 and summary["false_positives"]["1e-06"] == 0
    assert summary["null_overall_p_below"]["0.01"] < 0.1
    assert all(row["0.05"] < 0.15 for row in summary["null_module_p_below"].values()), summary["null_module_p_below"]
    assert all(result == "1/1" for result in summary["derived_detected"].values()), summary["derived_detected"]
    assert all(result == "1/1" for result in summary["derived_located"].values()), summary["derived_located"]


def test_null_pairs_are_distinct_models():
    pairs = null_pairs(list(range(6)), limit=5, seed=3)
    assert len(pairs) == 5 and all(i < j for i, j in pairs) and len(set(pairs)) == 5
    assert null_pairs(list(range(4)), limit=None) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
