"""Plain-PyTorch LM-head projection + cross-entropy + z-loss.

linear_cross_entropy(hidden (N, H), weight (V, H), targets (N,)) returns (ce, z):
  ce = mean over non-ignored rows of -log softmax(hidden @ weight.T)[target]
  z  = mean over the same rows of logsumexp(logits) ** 2   (z-loss on the output logits)
Rows whose target is `ignore_index` count in neither; with no such row both are 0. Logits are fp32.
This reference materialises the (N, V) logits; the Triton version streams the vocabulary in chunks.
"""

from __future__ import annotations

import torch


class _CrossEntropyAndZ(torch.autograd.Function):
    """Sums of cross-entropy and z-loss over rows of logits, both from one logsumexp.

    F.cross_entropy plus a separate logsumexp would exponentiate the (N, V) logits twice forward and twice
    backward; here the backward recomputes the softmax once from the saved logsumexp:
    d/dlogits = softmax * (g_ce + 2 g_z lse) - g_ce * onehot(target)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, lse, targets)
        return (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum(), lse.square().sum()

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_z: torch.Tensor):
        logits, lse, targets = ctx.saved_tensors
        grad = (logits - lse[:, None]).exp_()  # the softmax, in one (N, V) buffer
        grad *= (grad_ce + 2 * grad_z * lse)[:, None]
        grad[torch.arange(grad.shape[0], device=grad.device), targets] -= grad_ce
        return grad, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = targets != ignore_index
    logits = hidden[keep] @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; fp64 stays
    count = keep.sum().clamp(min=1)
    ce, z = _CrossEntropyAndZ.apply(logits, targets[keep])
    return ce / count, z / count
