"""Fused linear + cross-entropy + z-loss against the float64 reference (interpreter in fp32; bf16 on GPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel launches; the kernels read it lazily

pytest.importorskip("triton")

from kmodel.kernels.loss import reference, triton_impl  # noqa: E402
from kmodel.kernels.testing import assert_low_precision_close, low_precision_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _losses_and_grads(fn, hidden, weight, targets, ce_coef, z_coef):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    ce, z = fn(hidden, weight, targets)
    (ce_coef * ce + z_coef * z).backward()
    return ce.detach(), z.detach(), hidden.grad, weight.grad


def _inputs(num_rows, hidden_size, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    return hidden, weight, targets


def _check_against_float64(hidden, weight, targets, ce_coef, z_coef, tol=2e-5):
    expected = _losses_and_grads(reference.linear_cross_entropy, hidden, weight, targets, ce_coef, z_coef)
    actual = _losses_and_grads(
        triton_impl.linear_cross_entropy, hidden.float().to(DEVICE), weight.float().to(DEVICE), targets.to(DEVICE),
        ce_coef, z_coef,
    )
    for name, got, want in zip(("ce", "z", "grad_hidden", "grad_weight"), actual, expected):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol, msg=name)


def _by_definition(hidden, weight, targets, *, ignore_index=-100):
    """The reference's two losses written out with autograd's own log-softmax and logsumexp."""
    keep = targets != ignore_index
    logits = hidden[keep] @ weight.t()
    count = keep.sum().clamp(min=1)
    log_probs = torch.log_softmax(logits, dim=-1)
    ce = -log_probs.gather(1, targets[keep][:, None]).sum() / count
    return ce, torch.logsumexp(logits, dim=-1).pow(2).sum() / count


@pytest.mark.parametrize("ce_coef, z_coef", [(1.0, 0.0), (0.0, 1.0), (0.7, 1e-2), (0.0, 0.0)])
def test_reference_backward_matches_autograd_of_the_definition(ce_coef, z_coef):
    """The reference computes both losses from one logsumexp with a hand-written backward; it must equal
    autograd through the textbook formulas (float64, with ignored rows)."""
    hidden, weight, targets = _inputs(13, 8, 37, seed=3)
    targets[[2, 7]] = -100
    expected = _losses_and_grads(_by_definition, hidden, weight, targets, ce_coef, z_coef)
    actual = _losses_and_grads(reference.linear_cross_entropy, hidden, weight, targets, ce_coef, z_coef)
    for name, got, want in zip(("ce", "z", "grad_hidden", "grad_weight"), actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("ce_coef, z_coef", [(1.0, 0.0), (0.0, 1.0), (0.7, 1e-2)])
def test_matches_float64_reference_across_vocabulary_chunks(monkeypatch, ce_coef, z_coef):
    num_rows, vocab = 37, 300
    # 128-column chunks: 300 = 128 + 128 + 44, so rows fold three chunks, the last one partial.
    monkeypatch.setattr(triton_impl, "LOGITS_CHUNK_ELEMENTS", num_rows * 128)
    hidden, weight, targets = _inputs(num_rows, 24, vocab, seed=0)
    # Ignored rows, and targets on the first / last column of the vocabulary and of a chunk.
    targets[3] = targets[10] = -100
    targets[5], targets[6], targets[7], targets[8] = 0, vocab - 1, 127, 128
    _check_against_float64(hidden, weight, targets, ce_coef, z_coef)


def test_single_chunk_and_custom_ignore_index():
    hidden, weight, targets = _inputs(9, 16, 50, seed=1)
    targets[0] = 7
    expected = reference.linear_cross_entropy(hidden, weight, targets, ignore_index=7)
    actual = triton_impl.linear_cross_entropy(
        hidden.float().to(DEVICE), weight.float().to(DEVICE), targets.to(DEVICE), ignore_index=7
    )
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=2e-5)


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    hidden, weight, _ = _inputs(5, 16, 40, seed=2)
    targets = torch.full((5,), -100)
    ce, z, grad_hidden, grad_weight = _losses_and_grads(
        triton_impl.linear_cross_entropy, hidden.float().to(DEVICE), weight.float().to(DEVICE), targets.to(DEVICE),
        1.0, 1.0,
    )
    assert ce.item() == 0.0 and z.item() == 0.0
    assert not grad_hidden.any() and not grad_weight.any()


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, targets = _inputs(6, 16, 40, seed=3)
    hidden = hidden.float().to(DEVICE).requires_grad_()
    ce, _ = triton_impl.linear_cross_entropy(hidden, weight.float().to(DEVICE), targets.to(DEVICE))
    ce.backward()
    hidden_ref = hidden.detach().cpu().double().requires_grad_()
    reference.linear_cross_entropy(hidden_ref, weight, targets)[0].backward()
    torch.testing.assert_close(hidden.grad.cpu().double(), hidden_ref.grad, rtol=2e-5, atol=2e-5)


def test_rejects_out_of_range_target_and_bad_shapes():
    hidden, weight, targets = _inputs(4, 16, 40, seed=4)
    hidden, weight = hidden.float().to(DEVICE), weight.float().to(DEVICE)
    targets[2] = 40
    if DEVICE == "cpu":  # on CUDA the check is asynchronous (a device-side assert), by design
        with pytest.raises(RuntimeError, match="target is outside"):
            triton_impl.linear_cross_entropy(hidden, weight, targets)
    with pytest.raises(ValueError, match="hidden size"):
        triton_impl.linear_cross_entropy(hidden, weight[:, :8], targets.to(DEVICE))
    with pytest.raises(ValueError, match="targets for"):
        triton_impl.linear_cross_entropy(hidden, weight, targets[:3].to(DEVICE))


def test_ops_benchmark_runs_in_reduced_cpu_mode(tmp_path):
    from kmodel.kernels.loss import bench

    impls = ["triton", "torch", "reference"] if DEVICE == "cpu" else ["torch", "reference"]
    argv = ["--norm-shape", "64", "48", "--loss-shape", "32", "16", "300", "--impl", *impls, "--warmup", "0",
            "--iters", "1", "--device", "cpu", "--dtype", "fp32", "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "ops_cpu.json").read_text())
    assert result["reduced_cpu_mode"] and result["device_type"] == "cpu"
    assert {(row["op"], row["mode"]) for row in result["rows"]} == {
        (op, mode) for op in ("rms_norm", "linear_cross_entropy") for mode in ("forward", "forward+backward")
    }
    assert len(result["rows"]) == 4 * len(impls) and all(row["ms"] > 0 for row in result["rows"])


def test_low_precision_check_fails_an_all_zero_small_gradient():
    """The rule the GPU tests use cannot pass a zero gradient however small the true one (largest 6e-5 here)."""
    want = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2e-5
    low = want.bfloat16()
    assert low_precision_error(low, low, want)[0]
    assert not low_precision_error(torch.zeros_like(low), low, want)[0]
    assert not low_precision_error(low * 1.1, low, want)[0]  # a 10% error is not rounding either


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-sized bf16 shapes)")
def test_bf16_on_gpu_matches_reference_and_saves_memory():
    """Against float64, each tensor within twice the error of the reference run in bf16 plus 1% of its own
    largest value (its gradients are ~1e-4 to ~1e-3: a fixed 2e-2 tolerance once let an all-zero one pass)."""
    num_rows, hidden_size, vocab = 4096, 1024, 65536
    hidden, weight, targets = _inputs(num_rows, hidden_size, vocab, seed=5)
    hidden, weight, targets = hidden.cuda(), (weight * 0.1).cuda(), targets.cuda()
    want = _losses_and_grads(reference.linear_cross_entropy, hidden, weight, targets, 1.0, 1e-3)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    results = {}
    for name, fn in (("reference", reference.linear_cross_entropy), ("triton", triton_impl.linear_cross_entropy)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results[name] = _losses_and_grads(fn, hidden, weight, targets, 1.0, 1e-3)
        torch.cuda.synchronize()
        results[name + "_peak"] = torch.cuda.max_memory_allocated() - base
    for name, got, low, w in zip(("ce", "z", "grad_hidden", "grad_weight"), results["triton"], results["reference"],
                                 want):
        assert got.dtype == low.dtype, name
        assert_low_precision_close(name, got, low, w)
    # The reference holds (N, V) logits in bf16 and fp32 plus their gradient; the fused loss one chunk.
    assert results["triton_peak"] < results["reference_peak"] / 2
