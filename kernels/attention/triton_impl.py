"""Triton flash attention with the semantics of `reference.attention`: causal or two-sided, optional sliding
window, packed documents, GQA/MQA, attention sinks, forward and backward (an autograd Function); and
`decode_attention` for a few new tokens against a KV cache.

Forward: one program per (query block, batch, query head) keeps an online softmax over the key blocks its
window / causal limit / document can reach and saves the log-sum-exp. Backward, flash-attention-2 style:
delta = rowsum(dO * O); one program per (key block, batch, kv head) accumulates dK, dV over the query heads
of its group (no atomics, no repeated K/V); one program per (query block, batch, query head) computes dQ.

On CPU the kernels run under TRITON_INTERPRET=1 (tests); on CUDA they are autotuned over the
configs below, chosen for Hopper and not yet measured (see docs/kernels/attention.md).
"""

from __future__ import annotations

import math

import torch
import triton

from kmodel.kernels.attention import triton_kernels
from kmodel.kernels.triton_support import (
    dot_precision,
    interpreting,
    matmul_dtype,
    replayed_winner,
    tuning_configs,
)

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

# CUDA autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim; BLOCK_M
# counts query rows and BLOCK_N key rows in every kernel. Chosen without a GPU: configs that compile for sm_90
# within Hopper's 227 KiB of shared memory and without register spills (kernels/attention/compile_report.py,
# bench/results/attention_sm90_compile.md). Their speed is unmeasured.
_CUDA_CONFIGS = {
    "attention_fwd_kernel": {
        64: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
        128: [(128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3)],
        256: [(64, 32, 8, 2), (128, 16, 8, 2), (128, 32, 8, 1)],
    },
    "attention_bwd_dkdv_kernel": {
        64: [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 8, 3), (16, 128, 8, 3), (64, 64, 8, 2)],
        128: [(32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (32, 64, 8, 3), (64, 64, 8, 2)],
        256: [(32, 32, 8, 2), (16, 32, 8, 3), (32, 32, 8, 3), (16, 32, 8, 2)],
    },
    "attention_bwd_dq_kernel": {
        64: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
        128: [(128, 32, 8, 3), (128, 64, 8, 2), (128, 16, 8, 3), (64, 32, 4, 3)],
        256: [(128, 16, 8, 3), (128, 32, 8, 2), (64, 16, 8, 2)],
    },
}
# Tuned per power-of-two bucket of the sequence length and window (`_tuning_buckets`), not per exact value.
# Where v is narrower than q/k (MLA: q/k 192 computed as 128 + 64, v 128) the dK/dV kernel fits 64-key blocks,
# whose dots compile to Hopper's wgmma without spills; the hd256 list above keeps 32-key blocks (mma.sync),
# since 64 spill there with v at 256 too. Keyed by the computed (q/k, v) head dims (`computed_head_dims`), else
# by those rounded up to powers of two (`_config_dims`). MLA's q/k split as 128 + 64 needs fewer registers and
# less shared memory than at 256, which leaves room for wider key blocks in the forward and dQ kernels; its
# dK/dV kernel takes the (256, 128) list (64 x 64 blocks still spill). compile_report checks every list.
_NARROW_V_CONFIGS = {
    "attention_fwd_kernel": {(192, 128): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2), (128, 16, 8, 2)]},
    "attention_bwd_dkdv_kernel": {(256, 128): [(32, 64, 8, 2), (16, 64, 8, 3), (16, 64, 8, 2), (32, 64, 8, 3)]},
    "attention_bwd_dq_kernel": {
        (256, 128): [(128, 16, 8, 3), (64, 16, 8, 2)],  # (128, 32, 8, 2) spills here
        (192, 128): [(128, 32, 8, 2), (128, 16, 8, 3), (64, 16, 8, 2)],
    },
}
_AUTOTUNE_KEY = [
    "seq_bucket", "window_bucket", "CAUSAL", "HAS_WINDOW", "HAS_DOCS", "HEAD_DIM", "HEAD_DIM_2", "V_DIM",
    "DOT_PRECISION",
]
_autotuned: dict[tuple[str, int, int, int], triton.runtime.Autotuner] = {}


def _tuning_buckets(seq: int, window: int | None) -> tuple[int, int]:
    """The autotune key's sequence length and window, each rounded up to a power of two: generation meets a new
    prompt length at nearly every call, and an exact key would benchmark every config again each time."""
    return triton.next_power_of_2(seq), 0 if window is None else triton.next_power_of_2(window)


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def qk_pieces(head_dim: int) -> tuple[int, int]:
    """The q/k head dim as the kernels compute it: (HEAD_DIM, HEAD_DIM_2). A sum of two powers of two of at
    least 16 (MLA's 192 = 128 + 64, also 48, 96, 160, ...) splits into them, so nothing is padded; any other
    head dim pads to one power of two (HEAD_DIM_2 = 0)."""
    padded = _padded_head_dim(head_dim)
    first = padded // 2
    rest = head_dim - first
    if head_dim != padded and rest >= 16 and rest & (rest - 1) == 0:
        return first, rest
    return padded, 0


def _dim_meta(head_dim: int, v_dim: int) -> dict:
    """Constexprs for the q/k head dim (its pieces, `qk_pieces`) and the v head dim (padded), and whether they
    need masks for padded columns."""
    first, second = qk_pieces(head_dim)
    v_padded = _padded_head_dim(v_dim)
    return {
        "HEAD_DIM": first,
        "HEAD_DIM_2": second,
        "V_DIM": v_padded,
        "EVEN_D": head_dim == first + second,
        "EVEN_V": v_dim == v_padded,
    }


def computed_head_dims(head_dim: int, v_dim: int) -> tuple[int, int]:
    """The (q/k, v) widths the kernels multiply for these head dims: MLA's (192, 128) stays (192, 128), 24
    pads to 32."""
    dims = _dim_meta(head_dim, v_dim)
    return dims["HEAD_DIM"] + dims["HEAD_DIM_2"], dims["V_DIM"]


def _config_dims(head_dim: int, v_dim: int) -> tuple[int, int]:
    """The key of the config lists for computed (q/k, v) head dims: each rounded up to a power of two, at least 64."""
    return max(64, triton.next_power_of_2(head_dim)), max(64, v_dim)


def cuda_configs(name: str, head_dim: int, v_dim: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of kernel `name` for these computed head dims."""
    narrow_v = _NARROW_V_CONFIGS.get(name, {})
    rounded = _config_dims(head_dim, v_dim)
    configs = narrow_v.get((head_dim, v_dim), narrow_v.get(rounded))
    return configs if configs is not None else _CUDA_CONFIGS[name][max(rounded)]


def _launch(name: str, grid, dims: dict, *args, **meta) -> None:
    """Launch kernel `name`: fixed blocks under the interpreter, autotuned on CUDA per computed (q/k, v) head dims
    (`dims`, from `_dim_meta`, also passed to the kernel)."""
    kernel = getattr(triton_kernels, name)
    widths = (dims["HEAD_DIM"] + dims["HEAD_DIM_2"], dims["V_DIM"])
    if interpreting():
        sequence = [INTERPRETER_BLOCKS[name]]
        winner = replayed_winner()
        if winner is not None:  # as triton.autotune on a GPU: every CUDA config on these buffers, then the winner
            configs = [(m, n) for m, n, *_ in cuda_configs(name, *widths)]
            sequence = [*configs, configs[winner]]
        for block_m, block_n in sequence:
            blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
            kernel[grid(blocks)](*args, **meta, **dims, **blocks)
        return
    shape = (name, dims["HEAD_DIM"], dims["HEAD_DIM_2"], dims["V_DIM"])
    if shape not in _autotuned:
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in tuning_configs(cuda_configs(name, *widths))
        ]
        _autotuned[shape] = triton.autotune(configs=configs, key=_AUTOTUNE_KEY)(kernel.jit_function(False))
    _autotuned[shape][grid](*args, **meta, **dims)


def document_bounds(cu_seqlens: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (batch, seq) [start, end) of every token's document inside its batch row.

    cu_seqlens: cumulative document lengths over the flattened batch*seq tokens, as in the reference. Computed
    on the device without reading a value on the host (a packed batch's attention call used to wait for three
    such reads); its values are checked by device-side asserts.
    """
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must hold integers, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    total = batch * seq
    cu = cu_seqlens.to(torch.int64)
    torch._assert_async((cu[0] == 0) & (cu[-1] == total), f"cu_seqlens must start at 0 and end at batch*seq={total}")
    torch._assert_async((cu.diff() >= 0).all(), "cu_seqlens must not decrease")
    positions = torch.arange(total, device=cu.device)
    doc = (torch.searchsorted(cu, positions, right=True) - 1).view(batch, seq)
    row_start = torch.arange(batch, device=cu.device)[:, None] * seq
    start = (cu[doc] - row_start).clamp_(min=0)
    end = (cu[doc + 1] - row_start).clamp_(max=seq)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, *, same_seq: bool = True
) -> None:
    """same_seq: queries and keys cover the same positions (False for decoding against a cache)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; triton attention supports {SUPPORTED_DTYPES}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match in batch, seq and heads")
    batch, seq, q_heads, head_dim = q.shape
    if (k.shape[0], k.shape[3]) != (batch, head_dim) or (same_seq and k.shape[1] != seq):
        matched = "batch, seq and head_dim" if same_seq else "batch and head_dim"
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in {matched}")
    if q_heads % k.shape[2]:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of kv heads ({k.shape[2]})")
    if max(head_dim, v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims {head_dim} (q, k) and {v.shape[3]} (v) exceed the supported {MAX_HEAD_DIM}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"triton attention got tensors on {q.device}: it needs CUDA, or TRITON_INTERPRET=1 for CPU testing"
        )


def _autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in the dtype the kernels run in: autocast's when it is on (SDPA, the reference, casts all three
    to it), else their common dtype. Cast outside the autograd Function, so gradients flow back through it."""
    dtype = matmul_dtype("attention", q, k, v)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check_sinks(sinks: torch.Tensor | None, q: torch.Tensor) -> None:
    if sinks is None:
        return
    if sinks.shape != (q.shape[2],) or not sinks.dtype.is_floating_point or sinks.device != q.device:
        raise ValueError(
            f"sinks must be one float logit per query head, ({q.shape[2]},) on {q.device}; "
            f"got {tuple(sinks.shape)} {sinks.dtype} on {sinks.device}"
        )


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
    sinks: torch.Tensor | None = None,
) -> None:
    """Write attention into `out` (q's shape with v's head dim) and the natural-log log-sum-exp into fp32 `lse` (batch,
    q_heads, seq), sinks included. Inputs are checked and normalised by `attention`; window None means
    unlimited."""
    batch, seq, q_heads, head_dim = q.shape
    v_dim = v.shape[3]
    doc_start, doc_end = doc_bounds if doc_bounds is not None else (None, None)
    _launch(
        "attention_fwd_kernel",
        lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * q_heads),
        _dim_meta(head_dim, v_dim),
        q, k, v, out, lse, doc_start, doc_end, sinks,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        seq, head_dim, v_dim, q_heads, q_heads // k.shape[2], window or 0, scale * math.log2(math.e),
        *_tuning_buckets(seq, window),
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        HAS_DOCS=doc_bounds is not None,
        HAS_SINKS=sinks is not None,
        DOT_PRECISION=dot_precision(q.dtype),
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
    sinks: torch.Tensor | None = None,
    grad_sinks: torch.Tensor | None = None,
) -> None:
    """Write the gradients of `attention_forward` into grad_q, grad_k, grad_v (shaped like q, k, v) and, with
    sinks, into grad_sinks (q_heads,)."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads, v_dim = k.shape[2], v.shape[3]
    doc_start, doc_end = doc_bounds if doc_bounds is not None else (None, None)
    dims = _dim_meta(head_dim, v_dim)
    delta = torch.empty_like(lse)
    triton_kernels.attention_bwd_delta_kernel[(triton.cdiv(seq, DELTA_BLOCK_M), batch * q_heads)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], seq, v_dim, q_heads,
        HEAD_DIM=dims["V_DIM"], EVEN_D=dims["EVEN_V"], BLOCK_M=DELTA_BLOCK_M,
    )  # fmt: skip
    meta = dict(
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        HAS_DOCS=doc_bounds is not None,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    group = q_heads // kv_heads
    qk_scale = scale * math.log2(math.e)
    _launch(
        "attention_bwd_dkdv_kernel",
        lambda meta: (triton.cdiv(seq, meta["BLOCK_N"]), batch * kv_heads),
        dims,
        q, k, v, grad_out, lse, delta, grad_k, grad_v, doc_start, doc_end,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
        *grad_k.stride()[:3], *grad_v.stride()[:3],
        seq, head_dim, v_dim, kv_heads, group, window or 0, qk_scale, scale, *_tuning_buckets(seq, window),
        **meta,
    )  # fmt: skip
    _launch(
        "attention_bwd_dq_kernel",
        lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * q_heads),
        dims,
        q, k, v, grad_out, lse, delta, grad_q, doc_start, doc_end,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *grad_q.stride()[:3],
        seq, head_dim, v_dim, q_heads, group, window or 0, qk_scale, scale, *_tuning_buckets(seq, window),
        **meta,
    )  # fmt: skip
    if sinks is not None:
        # A sink's logit gradient is -sum over rows of p_sink * delta (it carries no value): p_sink = exp(sink - lse).
        p_sink = torch.exp(sinks.float()[None, :, None] - lse)
        grad_sinks.copy_(-(p_sink * delta).sum(dim=(0, 2)))


class FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the output and its log-sum-exp, recomputes the scores backward."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, window, causal, scale, doc_start, doc_end):
        batch, seq, q_heads, _ = q.shape
        doc_bounds = None if doc_start is None else (doc_start, doc_end)
        out = torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, q_heads, seq), dtype=torch.float32, device=q.device)
        attention_forward(
            q, k, v, out, lse, window=window, causal=causal, scale=scale, doc_bounds=doc_bounds, sinks=sinks
        )
        ctx.save_for_backward(q, k, v, out, lse, sinks, doc_start, doc_end)
        ctx.window, ctx.causal, ctx.scale = window, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, sinks, doc_start, doc_end = ctx.saved_tensors
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        grad_sinks = None if sinks is None else torch.empty(sinks.shape, dtype=torch.float32, device=sinks.device)
        attention_backward(
            _unit_last_stride(grad_out), q, k, v, out, lse, grad_q, grad_k, grad_v,
            window=ctx.window, causal=ctx.causal, scale=ctx.scale,
            doc_bounds=None if doc_start is None else (doc_start, doc_end), sinks=sinks, grad_sinks=grad_sinks,
        )  # fmt: skip
        if grad_sinks is not None:
            grad_sinks = grad_sinks.to(sinks.dtype)
        return grad_q, grad_k, grad_v, grad_sinks, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    q, k, v = _autocast(q, k, v)
    _check_inputs(q, k, v, window)
    _check_sinks(sinks, q)
    batch, seq, _, head_dim = q.shape
    if window is not None and window >= seq:
        window = None  # every pair of positions is closer than the window
    scale = head_dim**-0.5 if scale is None else float(scale)
    doc_start = doc_end = None
    if cu_seqlens is not None:
        doc_start, doc_end = document_bounds(cu_seqlens.to(q.device), batch, seq)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    sinks = None if sinks is None else sinks.contiguous()  # the kernel reads sinks[h] at offset h
    return FlashAttention.apply(q, k, v, sinks, window, bool(causal), scale, doc_start, doc_end)


# Decode: at most this many rows (query heads of a group x new tokens) per program; more take several launches.
MAX_DECODE_ROWS = 128
# Fixed decode key blocks per padded head dim on CUDA (memory-bound, so not autotuned), 4 warps.
DECODE_BLOCK_N = {64: 64, 128: 64, 256: 32}
DECODE_NUM_WARPS = 4


def decode_block_n(head_dim: int, v_dim: int) -> int:
    """The decode kernel's key block on CUDA for these (unpadded) head dims."""
    return DECODE_BLOCK_N[max(_config_dims(*computed_head_dims(head_dim, v_dim)))]
# Under the interpreter: small key blocks and a few key splits, so that tests exercise the merge.
INTERPRETER_DECODE = {"BLOCK_N": 16, "max_splits": 4}


def _decode_splits(programs: int, span: int, block_n: int, device: torch.device) -> int:
    """Key splits per (batch, kv head): enough programs to fill the GPU twice over, no split under a block."""
    if device.type == "cuda":
        wanted = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, programs)
    else:
        wanted = INTERPRETER_DECODE["max_splits"]
    return max(1, min(wanted, triton.cdiv(span, block_n)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_lens: torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a few new tokens against a KV cache (generation; forward only); see
    `reference.decode_attention` for the semantics.

    Reads no value on the host (cache_lens is checked by a device assert). More new tokens than one launch
    takes (MAX_DECODE_ROWS rows of query heads x tokens per kv head) are done in consecutive launches.
    """
    q, k_cache, v_cache = _autocast(q, k_cache, v_cache)
    _check_inputs(q, k_cache, v_cache, window, same_seq=False)
    _check_sinks(sinks, q)
    batch, new_tokens, q_heads, head_dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    if cache_lens.shape != (batch,) or cache_lens.dtype.is_floating_point or cache_lens.dtype == torch.bool:
        raise ValueError(f"cache_lens must be ({batch},) integers, got {tuple(cache_lens.shape)} {cache_lens.dtype}")
    cache_lens = cache_lens.to(q.device)
    torch._assert_async(
        ((cache_lens >= new_tokens) & (cache_lens <= capacity)).all(),
        f"cache_lens must lie in [new tokens={new_tokens}, capacity={capacity}]",
    )
    per_launch = max(1, MAX_DECODE_ROWS // group)
    if new_tokens > per_launch:  # query t sees slots up to its own: a chunk's rows end where its last token is
        chunks = []
        for first in range(0, new_tokens, per_launch):
            last = min(first + per_launch, new_tokens)
            chunks.append(decode_attention(
                q[:, first:last], k_cache, v_cache, cache_lens=cache_lens - (new_tokens - last),
                window=window, scale=scale, sinks=sinks,
            ))  # fmt: skip
        return torch.cat(chunks, dim=1)
    scale = head_dim**-0.5 if scale is None else float(scale)
    q, k_cache, v_cache = (_unit_last_stride(t) for t in (q, k_cache, v_cache))

    v_dim = v_cache.shape[3]
    dims = _dim_meta(head_dim, v_dim)
    block_n = INTERPRETER_DECODE["BLOCK_N"] if interpreting() else decode_block_n(head_dim, v_dim)
    span = capacity if window is None else min(capacity, window + new_tokens - 1)
    splits = _decode_splits(batch * kv_heads, span, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(span, splits), block_n) * block_n
    slots = (batch, q_heads, new_tokens, splits)
    partial_out = torch.empty((*slots, dims["V_DIM"]), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(slots, dtype=torch.float32, device=q.device)
    triton_kernels.attention_decode_kernel[(batch * kv_heads, splits)](
        q, k_cache, v_cache, cache_lens, partial_out, partial_lse,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        new_tokens, head_dim, v_dim, kv_heads, group, window or 0, scale * math.log2(math.e), split_len,
        HAS_WINDOW=window is not None, **dims,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=max(16, triton.next_power_of_2(group * new_tokens)), BLOCK_N=block_n, num_warps=DECODE_NUM_WARPS,
    )  # fmt: skip

    if sinks is not None:  # the sink joins as one more split: its logit as lse, no value
        sink_lse = sinks.float()[None, :, None, None].expand(batch, q_heads, new_tokens, 1)
        partial_lse = torch.cat((partial_lse, sink_lse), dim=-1)
        partial_out = torch.cat((partial_out, torch.zeros_like(partial_out[..., :1, :])), dim=-2)
    # Merge the splits by their log-sum-exp; splits that saw nothing carry -inf and weigh 0.
    top = partial_lse.amax(dim=-1, keepdim=True)
    weights = torch.exp(partial_lse - torch.where(top.isfinite(), top, 0.0))
    out = (weights[..., None] * partial_out).sum(dim=-2) / weights.sum(dim=-1, keepdim=True)
    return out[..., :v_dim].transpose(1, 2).to(q.dtype)
