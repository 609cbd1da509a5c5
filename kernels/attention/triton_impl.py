"""Triton flash attention with the semantics of `reference.attention`: causal or two-sided, optional sliding
window, packed documents, GQA/MQA, forward and backward (an autograd Function).

Forward: one program per (query block, batch, query head) keeps an online softmax over the key blocks its
window / causal limit / document can reach and saves the log-sum-exp. Backward, flash-attention-2 style:
delta = rowsum(dO * O); one program per (key block, batch, kv head) accumulates dK, dV over the query heads
of its group (no atomics, no repeated K/V); one program per (query block, batch, query head) computes dQ.

On CPU the kernels run under TRITON_INTERPRET=1 (tests, fp32 only); on CUDA they are autotuned over the
configs below, chosen for Hopper and not yet measured (see docs/kernels/attention.md).
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch
import triton

from kmodel.kernels.attention.reference import document_ids

_KERNEL_MODULE = "kmodel.kernels.attention.triton_kernels"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Fixed (BLOCK_M, BLOCK_N) under the interpreter, where autotuning would only cost time. tl.dot needs 16;
# query and key blocks differ so that tests exercise the block-range arithmetic of both sides.
INTERPRETER_BLOCKS = {
    "attention_fwd_kernel": (32, 16),
    "attention_bwd_dkdv_kernel": (16, 32),
    "attention_bwd_dq_kernel": (32, 16),
}
DELTA_BLOCK_M = 64

# CUDA autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim, sized
# for Hopper's 228 KiB of shared memory per SM. BLOCK_M counts query rows, BLOCK_N key rows in every kernel.
_CUDA_CONFIGS = {
    "attention_fwd_kernel": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
        256: [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
    },
    "attention_bwd_dkdv_kernel": {
        64: [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
        128: [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)],
        256: [(16, 64, 4, 2), (32, 64, 8, 2)],
    },
    "attention_bwd_dq_kernel": {
        64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
        256: [(64, 16, 4, 2), (64, 32, 8, 2)],
    },
}
_AUTOTUNE_KEY = ["seq_len", "window", "CAUSAL", "HAS_WINDOW", "HAS_DOCS", "HEAD_DIM", "DOT_PRECISION"]
_autotuned: dict[tuple[str, int], triton.runtime.Autotuner] = {}


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), read now rather than cached."""
    return bool(triton.knobs.runtime.interpret)


def _kernels() -> ModuleType:
    """The kernel module, built for the current TRITON_INTERPRET setting.

    `triton.jit` chooses interpreted or compiled kernels when it decorates, so the kernels live in their own
    module, imported at first launch and reloaded if the setting changed since (as in a test process where
    another module imported triton, or these kernels, before the flag was set).
    """
    module = importlib.import_module(_KERNEL_MODULE)
    if module.INTERPRETED != interpreting():
        module = importlib.reload(module)
        _autotuned.clear()
    return module


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _launch(name: str, grid, head_dim: int, *args, **meta) -> None:
    """Launch kernel `name`: fixed blocks under the interpreter, autotuned per padded head dim on CUDA."""
    kernels = _kernels()
    if kernels.INTERPRETED:
        block_m, block_n = INTERPRETER_BLOCKS[name]
        blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        getattr(kernels, name)[grid(blocks)](*args, **meta, **blocks)
        return
    padded = _padded_head_dim(head_dim)
    if (name, padded) not in _autotuned:
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in _CUDA_CONFIGS[name][max(64, padded)]
        ]
        _autotuned[name, padded] = triton.autotune(configs=configs, key=_AUTOTUNE_KEY)(getattr(kernels, name))
    _autotuned[name, padded][grid](*args, **meta)


def document_bounds(cu_seqlens: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (batch, seq) [start, end) of every token's document inside its batch row.

    cu_seqlens: cumulative document lengths over the flattened batch*seq tokens, as in the reference.
    """
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must hold integers, got {cu_seqlens.dtype}")
    cu = cu_seqlens.to(torch.int64)
    if cu.dim() == 1 and bool((cu.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must not decrease; got {cu.tolist()}")
    doc = document_ids(cu, batch, seq)
    row_start = torch.arange(batch, device=cu.device)[:, None] * seq
    start = (cu[doc] - row_start).clamp_(min=0)
    end = (cu[doc + 1] - row_start).clamp_(max=seq)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; triton attention supports {SUPPORTED_DTYPES}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    batch, seq, q_heads, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head_dim")
    if q_heads % k.shape[2]:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of kv heads ({k.shape[2]})")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is above the supported maximum {MAX_HEAD_DIM}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"triton attention got tensors on {q.device}: it needs CUDA, or TRITON_INTERPRET=1 for CPU testing"
        )


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are for testing: keep true fp32 products instead of tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    window: int | None,
    causal: bool,
    scale: float,
    doc_bounds: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Write attention into `out` (shaped like q) and the natural-log log-sum-exp into fp32 `lse` (batch,
    q_heads, seq). Inputs are checked and normalised by `attention`; window None means unlimited."""
    batch, seq, q_heads, head_dim = q.shape
    doc_start, doc_end = doc_bounds if doc_bounds is not None else (None, None)
    _launch(
        "attention_fwd_kernel",
        lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * q_heads),
        head_dim,
        q, k, v, out, lse, doc_start, doc_end,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        seq, head_dim, q_heads, q_heads // k.shape[2], window or 0, scale * math.log2(math.e),
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        HAS_DOCS=doc_bounds is not None,
        HEAD_DIM=_padded_head_dim(head_dim),
        EVEN_D=head_dim == _padded_head_dim(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype),
    )  # fmt: skip


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
    *,
    window: int | None,
    causal: bool,
    scale: float,
    doc_bounds: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Write the gradients of `attention_forward` into grad_q, grad_k, grad_v (shaped like q, k, v)."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    doc_start, doc_end = doc_bounds if doc_bounds is not None else (None, None)
    padded = _padded_head_dim(head_dim)
    even_d = head_dim == padded
    delta = torch.empty_like(lse)
    kernels = _kernels()
    kernels.attention_bwd_delta_kernel[(triton.cdiv(seq, DELTA_BLOCK_M), batch * q_heads)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], seq, head_dim, q_heads,
        HEAD_DIM=padded, EVEN_D=even_d, BLOCK_M=DELTA_BLOCK_M,
    )  # fmt: skip
    meta = dict(
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        HAS_DOCS=doc_bounds is not None,
        HEAD_DIM=padded,
        EVEN_D=even_d,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    group = q_heads // kv_heads
    qk_scale = scale * math.log2(math.e)
    _launch(
        "attention_bwd_dkdv_kernel",
        lambda meta: (triton.cdiv(seq, meta["BLOCK_N"]), batch * kv_heads),
        head_dim,
        q, k, v, grad_out, lse, delta, grad_k, grad_v, doc_start, doc_end,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
        *grad_k.stride()[:3], *grad_v.stride()[:3],
        seq, head_dim, kv_heads, group, window or 0, qk_scale, scale,
        **meta,
    )  # fmt: skip
    _launch(
        "attention_bwd_dq_kernel",
        lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * q_heads),
        head_dim,
        q, k, v, grad_out, lse, delta, grad_q, doc_start, doc_end,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *grad_q.stride()[:3],
        seq, head_dim, q_heads, group, window or 0, qk_scale, scale,
        **meta,
    )  # fmt: skip


class FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the output and its log-sum-exp, recomputes the scores backward."""

    @staticmethod
    def forward(ctx, q, k, v, window, causal, scale, doc_start, doc_end):
        batch, seq, q_heads, _ = q.shape
        doc_bounds = None if doc_start is None else (doc_start, doc_end)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, q_heads, seq), dtype=torch.float32, device=q.device)
        attention_forward(q, k, v, out, lse, window=window, causal=causal, scale=scale, doc_bounds=doc_bounds)
        ctx.save_for_backward(q, k, v, out, lse, doc_start, doc_end)
        ctx.window, ctx.causal, ctx.scale = window, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        attention_backward(
            _unit_last_stride(grad_out), q, k, v, out, lse, grad_q, grad_k, grad_v,
            window=ctx.window, causal=ctx.causal, scale=ctx.scale,
            doc_bounds=None if doc_start is None else (doc_start, doc_end),
        )  # fmt: skip
        return grad_q, grad_k, grad_v, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_inputs(q, k, v, window)
    batch, seq, _, head_dim = q.shape
    if window is not None and window >= seq:
        window = None  # every pair of positions is closer than the window
    scale = head_dim**-0.5 if scale is None else float(scale)
    doc_start = doc_end = None
    if cu_seqlens is not None:
        doc_start, doc_end = document_bounds(cu_seqlens.to(q.device), batch, seq)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return FlashAttention.apply(q, k, v, window, bool(causal), scale, doc_start, doc_end)
