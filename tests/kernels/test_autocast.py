"""The Triton ops under bf16 autocast, as the defaults run them on a GPU (`kernels: auto`, `train.dtype: auto`:
fp32 weights, bf16 autocast): each returns the dtype its reference returns under the same autocast, with
values within bf16 error of float64, and the whole tiny model with every kernel on Triton matches it with
every kernel on torch. On CPU this runs under the interpreter, which is what `triton_support.dot` (bf16 dots
widened there) makes possible.

Accuracy rule (`kernels.testing`): against float64, the Triton result's error is at most twice the error of the
reference run in the same low precision plus 2% (about five bf16 roundings) of the tensor's largest value; the
slack covers the kernels' bf16 rounding of probabilities before their dots, which the CPU reference skips.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel launches; the kernels read it lazily

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kmodel.kernels.attention import reference as attention_ref  # noqa: E402
from kmodel.kernels.attention import triton_impl as attention_triton  # noqa: E402
from kmodel.kernels.loss import reference as loss_ref  # noqa: E402
from kmodel.kernels.loss import triton_impl as loss_triton  # noqa: E402
from kmodel.kernels.moe import reference as moe_ref  # noqa: E402
from kmodel.kernels.moe import triton_impl as moe_triton  # noqa: E402
from kmodel.kernels.norm import reference as norm_ref  # noqa: E402
from kmodel.kernels.norm import triton_impl as norm_triton  # noqa: E402
from kmodel.kernels.testing import assert_low_precision_close  # noqa: E402
from kmodel.kernels.triton_support import dot, lazy_kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def _run(fn, inputs, *args, **kwargs):
    """fn(*leaves, *args, **kwargs) and the leaves' gradients for a fixed random cotangent; leaves keep dtypes."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(7)
    total = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    total.backward()
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves if leaf.requires_grad]


def _check_op(triton_fn, reference_fn, inputs, *args, **kwargs):
    """Same output and gradient dtypes as the reference under autocast, values within low-precision error."""
    with _autocast():
        got_out, got_grads = _run(triton_fn, inputs, *args, **kwargs)
        low_out, low_grads = _run(reference_fn, inputs, *args, **kwargs)
    want_out, want_grads = _run(reference_fn, [t.double() if t.is_floating_point() else t for t in inputs], *args,
                                **{key: value.double() if torch.is_tensor(value) and value.is_floating_point()
                                   else value for key, value in kwargs.items()})  # fmt: skip
    assert [o.dtype for o in got_out] == [o.dtype for o in low_out], "output dtypes"
    assert [g.dtype for g in got_grads] == [g.dtype for g in low_grads], "gradient dtypes"
    for index, (got, low, want) in enumerate(zip(got_out + got_grads, low_out + low_grads, want_out + want_grads)):
        assert_low_precision_close(f"output/gradient {index}", got, low, want, slack=2e-2)


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


@lazy_kernel()
def _dot_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
    rows = tl.arange(0, N)
    tile = rows[:, None] * N + rows[None, :]
    tl.store(out_ptr + tile, dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


def test_bf16_dot_is_right_under_the_interpreter():
    """tl.dot on bf16 tiles is wrong under Triton 3.9's interpreter (integers multiplied); the shared helper
    gives the exact fp32-accumulated product, as the GPU's bf16 MMA does."""
    a, b = _randn(32, 32, dtype=torch.bfloat16, seed=1), _randn(32, 32, dtype=torch.bfloat16, seed=2)
    out = torch.empty(32, 32, device=DEVICE)
    _dot_kernel[(1,)](a, b, out, 32)
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


@lazy_kernel()
def _store_kernel(src_ptr, dst_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets))


def test_bf16_stores_round_to_nearest_even_under_the_interpreter():
    """fp32 -> bf16 as on the GPU (and torch): to nearest, ties to even; the interpreter itself truncates."""
    one_ulp = 2.0**-7  # bf16 spacing in [1, 2)
    values = [1 + one_ulp / 2, 1 + 1.5 * one_ulp, 1 + 0.7 * one_ulp, -(1 + 0.7 * one_ulp), 3.0e38, float("nan")]
    src = torch.tensor(values + [0.0] * (16 - len(values)), device=DEVICE)
    dst = torch.empty(16, dtype=torch.bfloat16, device=DEVICE)
    _store_kernel[(1,)](src, dst, 16)
    torch.testing.assert_close(dst, src.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("window, sinks", [(None, False), (5, True)])
def test_attention_follows_autocast_as_sdpa_does(window, sinks):
    """Under autocast QK-norm hands attention fp32 q and k (its weight is fp32) and a bf16 v: the reference
    (SDPA) casts all three to bf16; the Triton op did not and refused the mixed dtypes at step 1."""
    q, k = _randn(1, 24, 4, 16, seed=3), _randn(1, 24, 2, 16, seed=4)
    v = _randn(1, 24, 2, 16, dtype=torch.bfloat16, seed=5)
    kwargs = dict(window=window, sinks=_randn(4, seed=6) if sinks else None)
    _check_op(attention_triton.attention, attention_ref.attention, [q, k, v], **kwargs)


def test_rms_norm_follows_autocast():
    """RMSNorm is no autocast op: bf16 activations times an fp32 weight give fp32 in both."""
    _check_op(norm_triton.rms_norm, norm_ref.rms_norm, [_randn(6, 40, dtype=torch.bfloat16), _randn(40, seed=1)], 1e-5)


def test_linear_cross_entropy_follows_autocast():
    """bf16 final hidden states, fp32 LM head: the projection runs in bf16 as autocast's matmul, losses fp32."""
    hidden, weight = _randn(10, 32, dtype=torch.bfloat16), _randn(72, 32, scale=0.3, seed=1)
    targets = torch.randint(0, 72, (10,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _check_op(loss_triton.linear_cross_entropy, loss_ref.linear_cross_entropy, [hidden, weight, targets])


@pytest.mark.parametrize("biases", [False, True], ids=["swiglu", "gpt-oss"])
def test_moe_experts_follow_autocast(biases):
    """bf16 tokens, fp32 expert weights (and gpt-oss's fp32 biases), fp32 routing weights: the expert GEMMs
    run in bf16 as linear layers do under autocast (bias cast with them), output bf16 in both."""
    num_tokens, hidden, inter, num_experts, top_k = 12, 32, 16, 4, 2
    gen = torch.Generator().manual_seed(3)
    experts = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]).to(DEVICE)
    inputs = [_randn(num_tokens, hidden, dtype=torch.bfloat16), experts, _randn(num_tokens, top_k, seed=1).sigmoid(),
              _randn(num_experts, 2 * inter, hidden, scale=0.2, seed=2), _randn(num_experts, hidden, inter, scale=0.2,
                                                                                   seed=4)]  # fmt: skip
    kwargs = {}
    if biases:
        kwargs = dict(gate_up_bias=_randn(num_experts, 2 * inter, scale=0.1, seed=5),
                      down_bias=_randn(num_experts, hidden, scale=0.1, seed=6), activation="clamped_swiglu")
    _check_op(moe_triton.moe_experts, moe_ref.moe_experts, inputs, **kwargs)


def _train_step(recipe: str, impl: str, overrides: list[str]):
    """Logits and parameter gradients of one training forward/backward of the tiny recipe under bf16 autocast."""
    from kmodel.config import load_config
    from kmodel.model import build_model

    cfg = load_config(recipe, overrides=overrides + [f"kernels.{op}={impl}" for op in ("attention", "moe", "norm",
                                                                                         "loss")])
    model = build_model(cfg, DEVICE)
    model.train()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=gen).to(DEVICE)
    labels = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=gen).to(DEVICE)
    with _autocast():
        out = model(input_ids, labels=labels, return_logits=True)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


TINY_RECIPES = {
    "tiny-ko-moe": ("recipes/tiny-ko-moe.yaml", ["model.sliding_window=8"]),  # QK-norm, sliding + global
    "gpt-oss": ("recipes/tiny/gpt-oss.yaml", ["model.sliding_window=8"]),  # sinks, expert biases, clamped SwiGLU
    "deepseek-v3": ("recipes/tiny/deepseek-v3.yaml", []),  # MLA: q/k 48, v 32
}


@pytest.mark.parametrize("recipe", TINY_RECIPES)
def test_tiny_model_every_kernel_triton_under_bf16_autocast(recipe):
    """The first GPU step of the defaults, on the interpreter: every kernel Triton vs every kernel torch, both
    under bf16 autocast. Logits within bf16 error of each other, loss close, every gradient finite and close
    (relative to its own size: bf16 rounding of different but equally valid orders)."""
    path, overrides = TINY_RECIPES[recipe]
    torch_out, torch_grads = _train_step(path, "torch", overrides)
    triton_out, triton_grads = _train_step(path, "triton", overrides)
    assert triton_out.logits.dtype == torch_out.logits.dtype
    scale = torch_out.logits.float().abs().max().item()
    logit_err = (triton_out.logits.float() - torch_out.logits.float()).abs().max().item()
    assert logit_err <= 2e-2 * scale, f"logits differ by {logit_err:.3g} (largest {scale:.3g})"
    torch.testing.assert_close(triton_out.loss.float(), torch_out.loss.float(), rtol=1e-2, atol=0)
    assert triton_grads.keys() == torch_grads.keys()
    for name, want in torch_grads.items():
        got = triton_grads[name]
        assert got.dtype == want.dtype and torch.isfinite(got).all(), name
        rel = ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()
        assert rel < 5e-2, f"grad {name}: relative error {rel:.3g}"
