"""Triton RMSNorm, forward and backward, with the semantics of `reference.rms_norm`.

Forward: each program normalises a block of rows in fp32, rounds the normalised rows to the input dtype (as the
reference does) and scales them by the weight in the promoted dtype; it keeps each row's 1/rms (fp32, 4 bytes
a row) so the backward does not redo that reduction.
Backward: dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * weight and x_hat = x * rstd; the weight
gradient sum(dy * x_hat) is reduced in two steps without atomics: each program sums its own row blocks into
one fp32 partial row, and torch adds the few partial rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kmodel.kernels.triton_support import check_device, interpreting, lazy_kernel

_MAX_HIDDEN = 65536  # one row must fit a single block


@lazy_kernel()
def _rms_norm_forward_kernel(
    x_ptr, weight_ptr, out_ptr, rstd_ptr,
    num_rows, hidden, eps,
    stride_x, stride_out,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < num_rows
    col_ok = cols < hidden
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=1) / hidden + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    # Round the normalised row to the input dtype before the weight, as the reference does.
    normed = (x32 * rstd[:, None]).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = (normed * weight[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out, mask=mask)


@lazy_kernel()
def _rms_norm_backward_kernel(
    grad_out_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, grad_weight_partial_ptr,
    num_rows, hidden,
    stride_grad_out, stride_x, stride_grad_x,
    COMPUTE_GRAD_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK_H], dtype=tl.float32)
    # Row blocks program, program + num_programs, ...: one weight-gradient partial per program.
    for first in range(program * BLOCK_ROWS, num_rows, tl.num_programs(0) * BLOCK_ROWS):
        rows = (first + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        row_ok = rows < num_rows
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(grad_out_ptr + rows[:, None] * stride_grad_out + cols[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        dy = dy.to(tl.float32)
        g = dy * weight[None, :]
        grad_x = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / hidden)[:, None])
        grad_x_ptrs = grad_x_ptr + rows[:, None] * stride_grad_x + cols[None, :]
        tl.store(grad_x_ptrs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_GRAD_WEIGHT:
            grad_weight += tl.sum(dy * x_hat, axis=0)
    if COMPUTE_GRAD_WEIGHT:
        tl.store(grad_weight_partial_ptr + program * hidden + cols, grad_weight, mask=col_ok)


def _launch_shape(num_rows: int, hidden: int) -> tuple[int, int, int]:
    """(BLOCK_H, rows per block, num_warps): a block of about 4k elements on GPU (several short rows, e.g.
    per-head q/k norms, share one program); under the interpreter, big blocks since its cost is per program."""
    block_h = triton.next_power_of_2(hidden)
    budget = 1 << 14 if interpreting() else 1 << 12
    block_rows = max(1, min(budget // block_h, triton.next_power_of_2(max(num_rows, 1))))
    return block_h, block_rows, min(max(block_h * block_rows // 512, 1), 16)


def _backward_programs(num_row_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; each sums its rows' weight gradient into one partial."""
    if interpreting() or device.type != "cuda":
        return max(1, min(num_row_blocks, 2))
    return max(1, min(num_row_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        hidden = x.shape[-1]
        rows = x.reshape(-1, hidden)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        num_rows = rows.shape[0]
        block_h, block_rows, num_warps = _launch_shape(num_rows, hidden)
        if num_rows > 0:
            _rms_norm_forward_kernel[(triton.cdiv(num_rows, block_rows),)](
                rows, weight, out, rstd, num_rows, hidden, eps, rows.stride(0), out.stride(0),
                BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=num_warps,
            )
        ctx.save_for_backward(rows, weight, rstd)
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], hidden)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        num_rows, hidden = rows.shape
        grad_rows = grad_out.reshape(-1, hidden)
        if grad_rows.stride(-1) != 1:
            grad_rows = grad_rows.contiguous()
        grad_x = torch.empty_like(rows)
        block_h, block_rows, num_warps = _launch_shape(num_rows, hidden)
        programs = _backward_programs(triton.cdiv(num_rows, block_rows), rows.device)
        need_weight = ctx.needs_input_grad[1]
        partial = torch.zeros(programs, hidden, dtype=torch.float32, device=rows.device)
        if num_rows > 0:
            _rms_norm_backward_kernel[(programs,)](
                grad_rows, rows, weight, rstd, grad_x, partial, num_rows, hidden,
                grad_rows.stride(0), rows.stride(0), grad_x.stride(0),
                COMPUTE_GRAD_WEIGHT=need_weight, BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=num_warps,
            )
        grad_weight = partial.sum(0).to(weight.dtype) if need_weight else None
        return grad_x.view(ctx.x_shape), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape); see reference.rms_norm for the semantics."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dimension {x.shape[-1]}"
        )
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] > _MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} exceeds the kernel's limit of {_MAX_HIDDEN}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    check_device(x)
    return _RMSNorm.apply(x, weight.contiguous(), eps)
