"""Triton RMSNorm, forward and backward, with the semantics of `reference.rms_norm`.

Forward: one program per row normalises in fp32, rounds the normalised row to the input dtype (as the
reference does) and scales it by the weight in the promoted dtype; it keeps the per-row 1/rms (fp32, 4 bytes
a row) so the backward never recomputes the reduction over the row twice.
Backward: dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * weight and x_hat = x * rstd; the weight
gradient sum(dy * x_hat) is reduced in two steps without atomics: each program sums its own rows into one
fp32 partial row, and torch adds the few partial rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kmodel.kernels.moe.triton_support import check_device, interpreting, lazy_kernel

_MAX_HIDDEN = 65536  # one row must fit a single block


@lazy_kernel()
def _rms_norm_forward_kernel(
    x_ptr, weight_ptr, out_ptr, rstd_ptr,
    hidden, eps,
    stride_x, stride_out,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    tl.store(rstd_ptr + row, rstd)
    # Round the normalised row to the input dtype before the weight, as the reference does.
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=in_row)


@lazy_kernel()
def _rms_norm_backward_kernel(
    grad_out_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, grad_weight_partial_ptr,
    num_rows, hidden, rows_per_program,
    stride_grad_out, stride_x, stride_grad_x,
    COMPUTE_GRAD_WEIGHT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, num_rows)
    # Walk the rows by advancing pointers, which are 64-bit (row * stride may overflow int32).
    grad_out_ptr += first * stride_grad_out
    x_ptr += first * stride_x
    grad_x_ptr += first * stride_grad_x
    rstd_ptr += first
    for _ in range(first, last):
        dy = tl.load(grad_out_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        x_hat = x * rstd
        g = dy * weight
        grad_x = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / hidden))
        tl.store(grad_x_ptr + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_row)
        if COMPUTE_GRAD_WEIGHT:
            grad_weight += dy * x_hat
        grad_out_ptr += stride_grad_out
        x_ptr += stride_x
        grad_x_ptr += stride_grad_x
        rstd_ptr += 1
    if COMPUTE_GRAD_WEIGHT:
        tl.store(grad_weight_partial_ptr + program * hidden + cols, grad_weight, mask=in_row)


def _backward_programs(num_rows: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; each sums its rows' weight gradient into one partial."""
    if interpreting() or device.type != "cuda":
        return max(1, min(num_rows, 4))
    return max(1, min(num_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        hidden = x.shape[-1]
        rows = x.reshape(-1, hidden)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(hidden)
        if rows.shape[0] > 0:
            _rms_norm_forward_kernel[(rows.shape[0],)](
                rows, weight, out, rstd, hidden, eps, rows.stride(0), out.stride(0), BLOCK_H=block,
                num_warps=min(max(block // 256, 1), 16),
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
        programs = _backward_programs(num_rows, rows.device)
        need_weight = ctx.needs_input_grad[1]
        partial = torch.zeros(programs, hidden, dtype=torch.float32, device=rows.device)
        if num_rows > 0:
            block = triton.next_power_of_2(hidden)
            _rms_norm_backward_kernel[(programs,)](
                grad_rows, rows, weight, rstd, grad_x, partial,
                num_rows, hidden, triton.cdiv(num_rows, programs),
                grad_rows.stride(0), rows.stride(0), grad_x.stride(0),
                COMPUTE_GRAD_WEIGHT=need_weight, BLOCK_H=block, num_warps=min(max(block // 256, 1), 16),
            )
        grad_weight = partial.sum(0).to(weight.dtype) if need_weight else None
        return grad_x.view(ctx.x_shape), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape); see reference.rms_norm for the semantics."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dimension {x.shape[-1]}")
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] > _MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} exceeds the kernel's limit of {_MAX_HIDDEN}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    check_device(x)
    return _RMSNorm.apply(x, weight, eps)
