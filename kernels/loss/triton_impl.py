"""Fused LM-head projection + cross-entropy + z-loss that streams the vocabulary in chunks.

Same semantics as `reference.linear_cross_entropy`, but the (N, V) logits never exist: only one
(N, chunk) slice at a time, sized by `LOGITS_CHUNK_ELEMENTS`.

Forward, per vocabulary chunk W[v0:v1]:
    logits = hidden @ W[v0:v1].T                        (cuBLAS, input dtype, as the reference)
    Triton: fold the chunk into each row's running (max, sum of exp) and pick the target logit if it lies here
and lse = max + log(sum) at the end; only lse (N,) fp32 is kept for the backward.
Backward, per chunk: recompute the logits slice, and a Triton kernel overwrites it in place with
    d loss / d logit = coef_p * softmax - coef_t * onehot(target)
where coef_p = (dce + 2 dz lse) / count and coef_t = dce / count on kept rows (0 on ignored rows); then
    grad_weight[v0:v1] = grad_logits.T @ hidden         (written once, in the weight's dtype)
    grad_hidden       += grad_logits @ W[v0:v1]         (fp32 accumulator of hidden's size)
Chunking the vocabulary (not the rows) means each weight-gradient slice is produced by one GEMM and the only
fp32 accumulator is hidden-sized, the smaller of the two for LM heads (N tokens per micro-batch < V).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kmodel.kernels.triton_support import check_device, interpreting, lazy_kernel, matmul_dtype

# Elements of the (rows, vocabulary chunk) logits slice held at once: 2**26 is 128 MiB in bf16, so the
# chunk is about 2k vocabulary columns for 32k rows and the whole vocabulary for small batches.
LOGITS_CHUNK_ELEMENTS = 1 << 26


@lazy_kernel()
def _lse_chunk_kernel(
    logits_ptr, targets_ptr, row_max_ptr, row_sum_ptr, target_logit_ptr,
    num_rows, chunk_start, chunk_width, stride_logits,
    BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Fold one vocabulary chunk of a block of rows into their running max / sum of exp / target logit."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_ok = rows < num_rows
    row_ptrs = logits_ptr + rows[:, None] * stride_logits
    cols = tl.arange(0, BLOCK_V)
    # Per-lane running max and sum; merged across lanes once at the end.
    lane_max = tl.full([BLOCK_ROWS, BLOCK_V], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK_ROWS, BLOCK_V], tl.float32)
    for start in range(0, chunk_width, BLOCK_V):
        mask = row_ok[:, None] & (start + cols < chunk_width)[None, :]
        logit = tl.load(row_ptrs + start + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, logit)
        # Lanes still at -inf (nothing seen yet) add 0; the guard avoids exp(-inf - -inf) = nan.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - safe_max) + tl.exp(logit - safe_max)
        lane_max = new_max
    chunk_max = tl.max(lane_max, axis=1)
    safe_chunk_max = tl.where(chunk_max == float("-inf"), 0.0, chunk_max)
    chunk_sum = tl.sum(lane_sum * tl.exp(lane_max - safe_chunk_max[:, None]), axis=1)

    old_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    old_sum = tl.load(row_sum_ptr + rows, mask=row_ok, other=0.0)
    new_max = tl.maximum(old_max, chunk_max)
    safe_new_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    new_sum = old_sum * tl.exp(old_max - safe_new_max) + chunk_sum * tl.exp(chunk_max - safe_new_max)
    tl.store(row_max_ptr + rows, new_max, mask=row_ok)
    tl.store(row_sum_ptr + rows, new_sum, mask=row_ok)

    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1) - chunk_start
    here = row_ok & (target >= 0) & (target < chunk_width)
    target_logit = tl.load(logits_ptr + rows * stride_logits + target, mask=here, other=0.0).to(tl.float32)
    tl.store(target_logit_ptr + rows, target_logit, mask=here)


@lazy_kernel()
def _logits_grad_kernel(
    logits_ptr, targets_ptr, lse_ptr, coef_softmax_ptr, coef_target_ptr,
    num_rows, chunk_start, chunk_width, stride_logits,
    BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Overwrite a block of rows of a logits chunk with d loss / d logit."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_ok = rows < num_rows
    row_ptrs = logits_ptr + rows[:, None] * stride_logits
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
    coef_softmax = tl.load(coef_softmax_ptr + rows, mask=row_ok, other=0.0)[:, None]
    coef_target = tl.load(coef_target_ptr + rows, mask=row_ok, other=0.0)[:, None]
    target = (tl.load(targets_ptr + rows, mask=row_ok, other=-1) - chunk_start)[:, None]
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, chunk_width, BLOCK_V):
        col = start + cols[None, :]
        mask = row_ok[:, None] & (col < chunk_width)
        logit = tl.load(row_ptrs + col, mask=mask, other=0.0).to(tl.float32)
        grad = coef_softmax * tl.exp(logit - lse) - tl.where(col == target, coef_target, 0.0)
        tl.store(row_ptrs + col, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_width(num_rows: int, vocab: int) -> int:
    """Vocabulary columns per chunk: LOGITS_CHUNK_ELEMENTS / rows, a multiple of 128 (GEMM-friendly)."""
    width = max(LOGITS_CHUNK_ELEMENTS // max(num_rows, 1), 128) // 128 * 128
    return min(width, vocab)


def _launch_shape(num_rows: int, width: int) -> tuple[int, int]:
    """(rows per program, BLOCK_V): one row per program on GPU; under the interpreter, whose cost is per
    program and per instruction, big 2D blocks."""
    if interpreting():
        return min(triton.next_power_of_2(max(num_rows, 1)), 32), min(triton.next_power_of_2(width), 1024)
    return 1, min(triton.next_power_of_2(width), 4096)


def _chunks(vocab: int, width: int):
    for start in range(0, vocab, width):
        yield start, min(start + width, vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int):
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        keep = targets != ignore_index
        count = keep.sum().clamp(min=1)
        row_max = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
        row_sum = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
        width = _chunk_width(num_rows, vocab)
        if num_rows > 0:
            for start, end in _chunks(vocab, width):
                logits = hidden @ weight[start:end].t()
                block_rows, block_v = _launch_shape(num_rows, end - start)
                _lse_chunk_kernel[(triton.cdiv(num_rows, block_rows),)](
                    logits, targets, row_max, row_sum, target_logit, num_rows, start, end - start,
                    logits.stride(0), BLOCK_ROWS=block_rows, BLOCK_V=block_v, num_warps=8,
                )
        lse = row_max + row_sum.log()
        kept_lse = torch.where(keep, lse, 0.0)
        ce = (kept_lse - torch.where(keep, target_logit, 0.0)).sum() / count
        z = kept_lse.pow(2).sum() / count
        ctx.save_for_backward(hidden, weight, targets, keep, count, lse)
        return ce, z

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        hidden, weight, targets, keep, count, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        # grad_ce / grad_z arrive as 0-dim tensors: no host sync to read them.
        scale = keep.float() / count
        coef_target = scale * grad_ce
        coef_softmax = scale * (grad_ce + 2.0 * grad_z * lse)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        width = _chunk_width(num_rows, vocab)
        for start, end in _chunks(vocab, width):
            grad_logits = hidden @ weight[start:end].t()
            if num_rows > 0:
                block_rows, block_v = _launch_shape(num_rows, end - start)
                _logits_grad_kernel[(triton.cdiv(num_rows, block_rows),)](
                    grad_logits, targets, lse, coef_softmax, coef_target, num_rows, start, end - start,
                    grad_logits.stride(0), BLOCK_ROWS=block_rows, BLOCK_V=block_v, num_warps=8,
                )
            if need_weight:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[start:end])
            if need_hidden:
                grad_hidden += grad_logits @ weight[start:end]
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean logsumexp²) of hidden @ weight.T against targets; see the reference."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            "linear_cross_entropy: expected hidden (N, H), weight (V, H), targets (N,), got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden size {hidden.shape[1]} != weight's {weight.shape[1]}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: {targets.shape[0]} targets for {hidden.shape[0]} hidden rows")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"linear_cross_entropy: targets must be int32 or int64, got {targets.dtype}")
    check_device(hidden, weight, targets)
    vocab = weight.shape[0]
    # Checked on the device: no host sync, and an out-of-range target fails loudly instead of reading nothing.
    torch._assert_async(
        ((targets == ignore_index) | ((targets >= 0) & (targets < vocab))).all(),
        f"linear_cross_entropy: a target is outside [0, {vocab}) and is not ignore_index={ignore_index}",
    )
    dtype = matmul_dtype("linear_cross_entropy", hidden, weight)
    return _LinearCrossEntropy.apply(
        hidden.to(dtype).contiguous(), weight.to(dtype).contiguous(), targets.contiguous(), ignore_index
    )
