"""Triton RMSNorm against the float64 reference (CPU interpreter in fp32; bf16 on GPU only)."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel launches; the kernels read it lazily

pytest.importorskip("triton")

from kmodel.kernels.norm import reference, triton_impl  # noqa: E402
from kmodel.kernels.testing import assert_low_precision_close  # noqa: E402
from kmodel.safe_path import python_command  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _forward_backward(fn, x, weight, grad_out, eps=1e-6):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    out = fn(x, weight, eps)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad, weight.grad


@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 48),  # rows shorter than the block: masked columns
        (40, 1000),  # several row blocks and two backward programs summing weight-gradient partials
        (3, 5, 4, 32),  # per-head q/k norm shape
    ],
)
def test_rms_norm_matches_float64_reference(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    expected = _forward_backward(reference.rms_norm, x, weight, grad_out)
    actual = _forward_backward(
        triton_impl.rms_norm, x.float().to(DEVICE), weight.float().to(DEVICE), grad_out.to(DEVICE)
    )
    for name, got, want in zip(("out", "grad_x", "grad_weight"), actual, expected):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=2e-5, msg=name)


def test_rms_norm_non_contiguous_input_and_frozen_weight():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 6, generator=gen).to(DEVICE).t().requires_grad_()  # (6, 24), row stride 1
    weight = torch.randn(24, generator=gen).to(DEVICE)
    out = triton_impl.rms_norm(x, weight, 1e-5)
    out.square().sum().backward()
    x_ref = x.detach().double().requires_grad_()
    ref = reference.rms_norm(x_ref, weight.double(), 1e-5)
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=2e-5, atol=2e-5)


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight shape"):
        triton_impl.rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), 1e-6)


def test_kernels_follow_triton_interpret_set_after_import():
    """A kernel module imported (and triton imported) before TRITON_INTERPRET is set still runs on the
    interpreter: the mode is read at launch, not at import."""
    script = textwrap.dedent(
        """
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton, torch
        from kmodel.kernels.norm import triton_impl, reference
        os.environ["TRITON_INTERPRET"] = "1"
        x, w = torch.randn(4, 16), torch.randn(16)
        torch.testing.assert_close(triton_impl.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
        print("ok")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(python_command("-c", script), capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_norm_benchmark_runs_in_reduced_cpu_mode(tmp_path):
    """`kmodel bench norm`: RMSNorm alone in its own table (the ops benchmark's measuring code)."""
    import json

    from kmodel.cli import main

    argv = ["bench", "norm", "--device", "cpu", "--impl", "torch", "reference", "--warmup", "0", "--iters", "1",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "norm_cpu.json").read_text())["rows"]
    assert {row["op"] for row in rows} == {"rms_norm"} and all(row["ms"] > 0 for row in rows)
    assert {row["impl"] for row in rows} == {"torch.nn.RMSNorm", "reference"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-sized bf16 shapes)")
def test_rms_norm_bf16_on_gpu():
    """Against float64, within twice the error of the reference run in bf16 plus 1% of each tensor's size."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 2048, generator=gen)
    weight = torch.randn(2048, generator=gen)
    grad_out = torch.randn(4096, 2048, generator=gen)
    expected = _forward_backward(reference.rms_norm, x.double(), weight.double(), grad_out.double())
    bf16 = [t.bfloat16().cuda() for t in (x, weight, grad_out)]
    low = _forward_backward(reference.rms_norm, *bf16)
    actual = _forward_backward(triton_impl.rms_norm, *bf16)
    for name, got, lo, want in zip(("out", "grad_x", "grad_weight"), actual, low, expected):
        assert got.dtype == torch.bfloat16, name
        assert_low_precision_close(name, got, lo, want)
