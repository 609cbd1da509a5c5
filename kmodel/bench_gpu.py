"""`kmodel bench gpu --out DIR`: the first run on a GPU, checked and measured by one command.

Meant for one H100, run once from a clone of the repository, within about 8 minutes. Stages, in order:

  tests      the gpu-marked kernel tests and tests/kernels/test_autocast.py (bf16 against float64; the tiny
             model's training step with every kernel Triton vs torch under bf16 autocast), each Triton kernel at
             its first autotune config (KMODEL_TRITON_CONFIGS=first: compiling every config of every variant
             would take the whole budget)
  autotuned  the MoE layer and attention fully autotuned, checked against float64 after tuning and again with
             the cached winner (autotuning once corrupted the router gradient)
  attention  `kmodel bench attention`: hd128, 32 query / 8 KV heads, 4k-32k tokens, windows 128 / 4096 / global,
             against SDPA (flash, cuDNN), FlexAttention and flash-attn where installed; then the MLA shape
  moe        `kmodel bench moe` at the Qwen3-30B-A3B and K-EXAONE shapes, against torch._grouped_mm and a loop
  ops        `kmodel bench ops`: RMSNorm and the fused linear cross-entropy, time and peak memory
  step       a training step (forward + backward) of a K-EXAONE-width slice: 2 MoE layers (one sliding, one
             global), 128 experts top-8, sequence 4096, bf16 weights; Triton vs torch kernels: tokens/s, MFU, memory

Every stage writes its Markdown and JSON table under DIR named by the device; the summary
`gpu_<device>.md/.json` lists each check and stage with its time and the issue's goals next to what was
measured. A benchmark skips (and says so in its table) what needs an absent package. Exit status: 0 when every
check passed, 1 when a correctness check failed or a stage broke, 2 without a CUDA device (nothing is run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kmodel.safe_path import python_command

STAGES = ("tests", "autotuned", "attention", "moe", "ops", "step")
REPO_ROOT = Path(__file__).resolve().parents[1]

# The goals, H100 SXM bf16: (what, unit, target).
GOALS = {
    "attention_fwd_16k_causal": ("attention forward, hd128, 16k tokens, global causal", "TFLOP/s", 540.0),
    "moe_fwd_bwd_qwen3": ("MoE layer forward+backward, Qwen3-30B-A3B shape, 16k tokens", "TFLOP/s", 400.0),
    "step_mfu": ("training step MFU, K-EXAONE-width MoE slice", "%", 45.0),
}


@dataclass
class Check:
    """One line of the summary: a test, a post-autotune check or a benchmark stage."""

    stage: str
    name: str
    status: str  # "passed", "failed", "skipped" or "done" (a benchmark that ran)
    seconds: float = 0.0
    detail: str = ""


def exit_code(checks: list[Check]) -> int:
    """1 when any check failed (a wrong result or a stage that broke), else 0."""
    return 1 if any(check.status == "failed" for check in checks) else 0


# ------------------------------------------------------------------------------------------------ tests


def junit_checks(path: Path, stage: str = "tests") -> list[Check]:
    """One Check per test case of a pytest --junitxml report."""
    checks = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        status, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                status = "skipped" if tag == "skipped" else "failed"
                detail = (found.get("message") or "").splitlines()[0][:200] if found.get("message") else tag
                break
        checks.append(Check(stage, name, status, float(case.get("time", 0.0)), detail))
    return checks


def run_tests(out_dir: Path, slug: str) -> list[Check]:
    """The gpu-marked kernel tests (bf16 runs, fp16 left out for time) and the autocast tests, in a fresh pytest
    process each, every Triton kernel at its first autotune config."""
    tests = REPO_ROOT / "tests" / "kernels"
    if not tests.is_dir():
        return [Check("tests", "kernel tests", "skipped", detail=f"{tests} not found: run from a clone")]
    env = {**os.environ, "KMODEL_TRITON_CONFIGS": "first"}
    env.pop("TRITON_INTERPRET", None)
    checks = []
    for label, selection in (("gpu", [str(tests), "-m", "gpu", "-k", "not float16"]),
                             ("autocast", [str(tests / "test_autocast.py")])):
        report = out_dir / f"gpu_tests_{label}_{slug}.xml"
        command = python_command("-m", "pytest", *selection, "-q", "-p", "no:cacheprovider", f"--junitxml={report}")
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
        print(result.stdout[-3000:], result.stderr[-1000:], sep="\n", flush=True)
        if report.is_file():
            checks += junit_checks(report)
        else:
            checks.append(Check("tests", f"pytest {label}", "failed", time.perf_counter() - start,
                                (result.stderr or result.stdout)[-300:]))
    return checks


# --------------------------------------------------------------------------------------- autotuned checks


def _fwd_bwd(fn: Callable, inputs: list, differentiable: list[int], cotangent_seed: int = 1):
    """fn's output and the gradients of `differentiable` inputs for a fixed random cotangent."""
    leaves = [t.detach().clone().requires_grad_(i in differentiable) if torch.is_tensor(t) else t
              for i, t in enumerate(inputs)]  # fmt: skip
    out = fn(*leaves)
    gen = torch.Generator(device=out.device).manual_seed(cotangent_seed)
    out.backward(torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype))
    return [out.detach()] + [leaves[i].grad for i in differentiable]


def _compare(stage: str, name: str, triton_fn, reference_fn, inputs, differentiable, seconds_from) -> list[Check]:
    """Triton's result after autotuning and again with the cached winner, against float64 (`kernels.testing`)."""
    from kmodel.kernels.testing import low_precision_error

    def cast(dtype):
        return [t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]

    want = _fwd_bwd(reference_fn, cast(torch.float64), differentiable)
    low = _fwd_bwd(reference_fn, cast(torch.bfloat16), differentiable)
    checks = []
    for run in ("after autotuning", "cached winner"):
        got = _fwd_bwd(triton_fn, cast(torch.bfloat16), differentiable)
        failures = []
        for index, (g, lo, w) in enumerate(zip(got, low, want)):
            passed, message = low_precision_error(g, lo, w, slack=2e-2)
            if not passed:
                failures.append(f"{'output' if index == 0 else f'grad {index}'}: {message}")
        status = "failed" if failures else "passed"
        checks.append(Check(stage, f"{name}, {run}", status, time.perf_counter() - seconds_from, "; ".join(failures)))
    return checks


def run_autotuned(
    device: torch.device,
    moe_shape: tuple[int, int, int, int, int] = (2048, 1024, 768, 32, 8),
    attention_shape: tuple[int, int, int, int] = (2048, 16, 4, 128),
    windows: tuple[int | None, ...] = (None, 512),
) -> list[Check]:
    """moe_shape: (tokens, hidden, expert width, experts, top-k); I = 768 spans several 64/128-column slices.
    attention_shape: (tokens, q heads, kv heads, head dim)."""
    from kmodel.kernels.attention import reference as attention_ref
    from kmodel.kernels.attention import triton_impl as attention_triton
    from kmodel.kernels.moe import reference as moe_ref
    from kmodel.kernels.moe import triton_impl as moe_triton

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float64) * scale

    checks = []
    tokens, hidden, inter, experts, top_k = moe_shape
    expert_ids = torch.rand(tokens, experts, generator=gen, device=device).argsort(dim=1)[:, :top_k]
    moe_inputs = [randn(tokens, hidden), expert_ids, torch.rand(tokens, top_k, generator=gen, device=device,
                  dtype=torch.float64), randn(experts, 2 * inter, hidden, scale=hidden**-0.5),
                  randn(experts, hidden, inter, scale=inter**-0.5)]  # fmt: skip
    start = time.perf_counter()
    label = f"moe_experts fwd+bwd ({tokens} tokens, {experts} experts top-{top_k}, H {hidden}, I {inter})"
    checks += _compare("autotuned", label, moe_triton.moe_experts, moe_ref.moe_experts, moe_inputs, [0, 2, 3, 4],
                       start)
    seq, q_heads, kv_heads, head_dim = attention_shape
    for window in windows:
        q, k, v = randn(1, seq, q_heads, head_dim), randn(1, seq, kv_heads, head_dim), randn(1, seq, kv_heads, head_dim)
        start = time.perf_counter()
        shape = f"{seq} tokens, {q_heads} q / {kv_heads} kv heads, hd{head_dim}, window {window or 'global'}"
        checks += _compare(
            "autotuned", f"attention fwd+bwd ({shape})",
            lambda q, k, v, w=window: attention_triton.attention(q, k, v, window=w),
            lambda q, k, v, w=window: attention_ref.attention(q, k, v, window=w), [q, k, v], [0, 1, 2], start,
        )
    return checks


# ------------------------------------------------------------------------------------------- benchmarks


def _bench_stage(stage: str, module: str, argv: list[str]) -> Check:
    """Run `kmodel bench NAME argv` in this process (autotuning results are shared with later stages)."""
    import importlib

    start = time.perf_counter()
    try:
        code = importlib.import_module(module).main(argv)
    except Exception as error:  # a broken stage is reported, and the later ones still run
        traceback.print_exc()
        return Check("bench", stage, "failed", time.perf_counter() - start, f"{type(error).__name__}: {error}"[:300])
    status = "done" if code == 0 else "failed"
    return Check("bench", stage, status, time.perf_counter() - start, " ".join(argv))


def run_attention(out_dir: Path, slug: str) -> list[Check]:
    timing = ["--warmup", "2", "--repeats", "5"]
    gqa = ["--seq", "4096", "8192", "16384", "32768", "--windows", "128", "4096", "none", "--q-heads", "32",
           "--kv-heads", "8", "--head-dim", "128", "--impls", "triton", "sdpa-flash", "sdpa-cudnn", "flex",
           "flash-attn", "--out", str(out_dir / f"attention_{slug}")]  # fmt: skip
    mla = ["--seq", "4096", "16384", "--windows", "none", "--q-heads", "32", "--kv-heads", "32", "--head-dim",
           "192", "--v-dim", "128", "--impls", "triton", "sdpa-flash", "sdpa-cudnn", "flex", "flash-attn",
           "--out", str(out_dir / f"attention_mla_{slug}")]  # fmt: skip
    module = "kmodel.kernels.attention.bench"
    return [_bench_stage("attention (GQA hd128)", module, gqa + timing),
            _bench_stage("attention (MLA q/k 192, v 128)", module, mla + timing)]


def run_moe(out_dir: Path, slug: str) -> list[Check]:
    argv = ["--preset", "qwen3-30b-a3b", "--preset", "k-exaone-236b", "--tokens", "16384", "--warmup", "2",
            "--iters", "5", "--out-dir", str(out_dir), "--name", f"moe_{slug}"]  # fmt: skip
    return [_bench_stage("moe", "kmodel.kernels.moe.bench", argv)]


def run_ops(out_dir: Path, slug: str) -> list[Check]:
    argv = ["--warmup", "2", "--iters", "5", "--out-dir", str(out_dir), "--name", f"ops_{slug}"]
    return [_bench_stage("ops (RMSNorm, fused linear cross-entropy)", "kmodel.kernels.loss.bench", argv)]


# ---------------------------------------------------------------------------------------- training step

STEP_RECIPE = "recipes/k-exaone-236b-a23b.yaml"
# Full K-EXAONE width, two layers: one sliding, one global, both MoE; no MTP depth.
STEP_OVERRIDES = ["model.num_hidden_layers=2", "model.first_k_dense_replace=0", "model.sliding_window_pattern=LG",
                  "model.num_nextn_predict_layers=0"]  # fmt: skip


def _slice_model(impl: str, device: torch.device, recipe: str, overrides: list[str]):
    """The recipe's model (the K-EXAONE slice) with bf16 weights drawn on the device (N(0, 0.02), norms 1): the
    deterministic CPU init of 12B parameters would take minutes of the budget, and timing does not depend on
    the draw."""
    from kmodel.config import load_config
    from kmodel.kernels import OPS
    from kmodel.model import build_model

    cfg = load_config(REPO_ROOT / recipe, overrides=overrides + [f"kernels.{op}={impl}" for op in OPS])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = build_model(cfg, device, init=False)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    return cfg, model.train()


def run_step(
    out_dir: Path, slug: str, device: torch.device, *, seq: int = 4096, warmup: int = 2, iters: int = 5,
    recipe: str = STEP_RECIPE, overrides: tuple[str, ...] = tuple(STEP_OVERRIDES),
) -> list[Check]:
    from kmodel.kernels.benchmarking import device_name, environment, peak_memory_bytes, time_ms, write_results
    from kmodel.train.flops import peak_flops, training_flops_per_token

    start = time.perf_counter()
    rows = []
    try:
        for impl in ("triton", "torch"):
            cfg, model = _slice_model(impl, device, recipe, list(overrides))
            gen = torch.Generator(device=device).manual_seed(0)
            ids = torch.randint(0, cfg.model.vocab_size, (1, seq), generator=gen, device=device)

            def step(model=model, ids=ids):
                model.zero_grad(set_to_none=True)
                model(ids, labels=ids).loss.backward()

            ms = time_ms(step, device, warmup=warmup, iters=iters)
            peak = peak_memory_bytes(step, device)
            tokens_per_s = seq / (ms * 1e-3)
            flops = training_flops_per_token(model, seq) * tokens_per_s
            peak_device = peak_flops(device)
            rows.append(dict(kernels=impl, ms=ms, tokens_per_s=tokens_per_s, tflops=flops / 1e12,
                             mfu_pct=None if peak_device is None else 100 * flops / peak_device,
                             peak_gib=None if peak is None else peak / 2**30))  # fmt: skip
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except Exception as error:
        traceback.print_exc()
        return [Check("bench", "training step", "failed", time.perf_counter() - start,
                      f"{type(error).__name__}: {error}"[:300])]
    notes = [
        f"{recipe} with {' '.join(overrides)} (by default: hidden 6144, 64 q / 8 kv heads, 128 experts top-8 plus a "
        f"shared expert, vocabulary 153600); batch 1 x {seq} tokens, bf16 weights (no autocast, no optimizer): "
        f"forward + backward, median of {iters} steps after {warmup} warm-up steps.",
        "MFU = training FLOPs per token (kmodel.train.flops: 3 x (2 x active parameters + attention)) x tokens/s / "
        "the device's dense bf16 peak; peak_gib: CUDA high-water mark of one step above what was held before.",
    ]
    columns = ["kernels", "ms", "tokens_per_s", "tflops", "mfu_pct", "peak_gib"]
    write_results(out_dir, f"step_{slug}", f"MoE slice ({Path(recipe).stem}), training step on {device_name(device)}",
                  notes, columns, rows, {"benchmark": "step", **environment(device, torch.bfloat16)})
    return [Check("bench", "training step", "done", time.perf_counter() - start, f"step_{slug}.md")]


# ------------------------------------------------------------------------------------------------ summary


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def measured_goals(out_dir: Path, slug: str) -> dict[str, float | None]:
    """The numbers the goals are about, read back from the stages' JSON tables (None where not measured)."""
    attention = [r for r in _rows(out_dir / f"attention_{slug}.json")
                 if r.get("impl") == "triton" and r.get("seq") == 16384 and r.get("window") == "global"]
    moe = [r for r in _rows(out_dir / f"moe_{slug}.json") if r.get("impl") == "triton"
           and r.get("shape") == "qwen3-30b-a3b" and r.get("mode") == "forward+backward" and r.get("tokens") == 16384]
    step = [r for r in _rows(out_dir / f"step_{slug}.json") if r.get("kernels") == "triton"]
    return {
        "attention_fwd_16k_causal": attention[0].get("fwd_tflops") if attention else None,
        "moe_fwd_bwd_qwen3": moe[0].get("tflops") if moe else None,
        "step_mfu": step[0].get("mfu_pct") if step else None,
    }


def write_summary(out_dir: Path, slug: str, device_label: str, checks: list[Check], measured: dict) -> int:
    """gpu_<slug>.md/.json: every check with its status and time, and the goals against what was measured;
    returns the exit code."""
    from kmodel.kernels.benchmarking import write_results

    code = exit_code(checks)
    failed = [check for check in checks if check.status == "failed"]
    goals = []
    for key, (what, unit, target) in GOALS.items():
        value = measured.get(key)
        met = None if value is None else ("yes" if value >= target else "no")
        goals.append(dict(stage="goal", name=what, status=met or "not measured",
                          detail=f"{'n/a' if value is None else f'{value:.1f}'} {unit} (goal >= {target:g})"))
    notes = [
        f"`kmodel bench gpu` on {device_label}: {len(checks)} checks, {len(failed)} failed; exit status {code}. "
        "Tests ran each Triton kernel at its first autotune config; the autotuned stage checks the tuned kernels.",
    ]
    rows = [asdict(check) for check in checks] + goals
    write_results(out_dir, f"gpu_{slug}", f"GPU check and benchmark on {device_label}", notes,
                  ["stage", "name", "status", "seconds", "detail"], rows,
                  {"benchmark": "gpu", "exit_code": code, "measured": measured})
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmodel bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the tables go")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run (all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("kmodel bench gpu needs a CUDA GPU and found none: nothing was run or written. "
              "(On CPU the kernels are checked by the test suite under TRITON_INTERPRET=1.)")
        return 2
    from kmodel.kernels.benchmarking import device_name, device_slug

    device = torch.device("cuda")
    slug, label = device_slug(device), device_name(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {
        "tests": lambda: run_tests(args.out, slug),
        "autotuned": lambda: run_autotuned(device),
        "attention": lambda: run_attention(args.out, slug),
        "moe": lambda: run_moe(args.out, slug),
        "ops": lambda: run_ops(args.out, slug),
        "step": lambda: run_step(args.out, slug, device),
    }
    checks: list[Check] = []
    begin = time.perf_counter()
    for stage in args.stages:
        start = time.perf_counter()
        print(f"== {stage} ==", flush=True)
        try:
            checks += stages[stage]()
        except Exception as error:  # report the broken stage, keep the others
            traceback.print_exc()
            detail = f"{type(error).__name__}: {error}"[:300]
            checks.append(Check(stage, stage, "failed", time.perf_counter() - start, detail))
        elapsed, total = time.perf_counter() - start, time.perf_counter() - begin
        print(f"== {stage}: {elapsed:.0f} s (total {total:.0f} s)", flush=True)
    return write_summary(args.out, slug, label, checks, measured_goals(args.out, slug))
