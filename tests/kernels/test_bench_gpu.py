"""`kmodel bench gpu`, the parts a CPU can check: it refuses without CUDA (writing nothing), turns test reports and
post-autotune comparisons into checks, writes its summary with the goals, and exits non-zero when a check fails."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the stages' plumbing runs on the interpreter below

from kmodel import bench_gpu
from kmodel.kernels.benchmarking import write_results


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda_and_writes_nothing(tmp_path, capsys):
    from kmodel.cli import main

    assert main(["bench", "gpu", "--out", str(tmp_path / "out")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_junit_report_becomes_checks(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.kernels.test_loss" name="test_a" time="1.5"/>'
        '<testcase classname="tests.kernels.test_loss" name="test_b" time="0.2">'
        '<failure message="AssertionError: grad_weight: error 1e-3 vs bound 2e-5&#10;more">trace</failure></testcase>'
        '<testcase classname="tests.kernels.test_moe" name="test_c" time="0"><skipped message="needs x"/></testcase>'
        "</testsuite></testsuites>"
    )
    checks = bench_gpu.junit_checks(report)
    assert [(c.name.split("::")[1], c.status) for c in checks] == [("test_a", "passed"), ("test_b", "failed"),
                                                                    ("test_c", "skipped")]  # fmt: skip
    assert checks[1].detail == "AssertionError: grad_weight: error 1e-3 vs bound 2e-5"
    assert bench_gpu.exit_code(checks) == 1
    assert bench_gpu.exit_code([checks[0], checks[2]]) == 0


def test_post_autotune_comparison_fails_a_wrong_kernel():
    """The autotuned stage's comparison (float64 truth, bf16 reference as the yardstick) on stand-in functions:
    a right one passes twice (after tuning, cached winner), one 10% off fails and names the tensor."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    right = bench_gpu._compare("autotuned", "sin", torch.sin, torch.sin, [x], [0], 0.0)
    assert [c.status for c in right] == ["passed", "passed"]
    wrong = bench_gpu._compare("autotuned", "sin", lambda t: torch.sin(t) * 1.1, torch.sin, [x], [0], 0.0)
    assert [c.status for c in wrong] == ["failed", "failed"] and "output" in wrong[0].detail
    assert bench_gpu.exit_code(right + wrong) == 1


def test_summary_reads_the_goals_back_and_sets_the_exit_code(tmp_path):
    slug = "nvidia_h100_80gb_hbm3"
    write_results(tmp_path, f"attention_{slug}", "t", [], ["impl"], [
        dict(impl="triton", seq=16384, window="global", fwd_tflops=512.0),
        dict(impl="sdpa-cudnn", seq=16384, window="global", fwd_tflops=560.0)], {})  # fmt: skip
    write_results(tmp_path, f"moe_{slug}", "t", [], ["impl"], [
        dict(shape="qwen3-30b-a3b", tokens=16384, mode="forward+backward", impl="triton", tflops=410.0)], {})
    measured = bench_gpu.measured_goals(tmp_path, slug)
    assert measured == {"attention_fwd_16k_causal": 512.0, "moe_fwd_bwd_qwen3": 410.0, "step_mfu": None}
    checks = [bench_gpu.Check("tests", "test_a", "passed", 1.0), bench_gpu.Check("bench", "moe", "done", 60.0)]
    assert bench_gpu.write_summary(tmp_path, slug, "NVIDIA H100 80GB HBM3", checks, measured) == 0
    rows = json.loads((tmp_path / f"gpu_{slug}.json").read_text())["rows"]
    goals = {row["name"]: (row["status"], row["detail"]) for row in rows if row["stage"] == "goal"}
    assert goals[bench_gpu.GOALS["attention_fwd_16k_causal"][0]] == ("no", "512.0 TFLOP/s (goal >= 540)")
    assert goals[bench_gpu.GOALS["moe_fwd_bwd_qwen3"][0]][0] == "yes"
    assert goals[bench_gpu.GOALS["step_mfu"][0]][0] == "not measured"
    checks.append(bench_gpu.Check("autotuned", "moe", "failed", 2.0, "grad 2: error"))
    assert bench_gpu.write_summary(tmp_path, slug, "NVIDIA H100 80GB HBM3", checks, measured) == 1
    assert "1 failed; exit status 1" in (tmp_path / f"gpu_{slug}.md").read_text()


def test_training_step_slice_is_k_exaone_width():
    """The step stage's model: K-EXAONE's width and experts, two MoE layers (one sliding, one global)."""
    from kmodel.config import load_config

    cfg = load_config(bench_gpu.REPO_ROOT / bench_gpu.STEP_RECIPE, overrides=bench_gpu.STEP_OVERRIDES).model
    assert (cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (6144, 128, 8,
                                                                                                       2048)
    assert list(cfg.layer_types) == ["sliding_attention", "full_attention"] and cfg.first_k_dense_replace == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal of the GPU stages")
def test_autotuned_stage_runs_on_the_interpreter_at_tiny_shapes():
    """The post-autotune stage's own code (inputs, bf16 runs, float64 truth) end to end, at tiny shapes on the
    interpreter: every check passes, for MoE and for attention with and without a window."""
    checks = bench_gpu.run_autotuned(torch.device("cpu"), moe_shape=(24, 32, 96, 4, 2), attention_shape=(40, 4, 2, 16),
                                     windows=(None, 7))  # fmt: skip
    assert len(checks) == 2 * 3 and all(check.status == "passed" for check in checks), checks


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal of the GPU stages")
def test_step_stage_runs_on_the_interpreter_with_a_tiny_recipe(tmp_path):
    """The training-step stage's own code with the tiny recipe: Triton and torch rows, tokens/s, no MFU on CPU."""
    checks = bench_gpu.run_step(tmp_path, "cpu", torch.device("cpu"), seq=16, warmup=0, iters=1,
                                recipe="recipes/tiny-ko-moe.yaml", overrides=("model.num_nextn_predict_layers=0",))
    assert [check.status for check in checks] == ["done"], checks
    rows = json.loads((tmp_path / "step_cpu.json").read_text())["rows"]
    assert [row["kernels"] for row in rows] == ["triton", "torch"]
    assert all(row["tokens_per_s"] > 0 and row["mfu_pct"] is None for row in rows)
