"""Plain-PyTorch LM-head projection + cross-entropy + z-loss.

linear_cross_entropy(hidden (N, H), weight (V, H), targets (N,)) returns (ce, z):
  ce = mean over non-ignored rows of -log softmax(hidden @ weight.T)[target]
  z  = mean over the same rows of logsumexp(logits) ** 2   (z-loss on the output logits)
Rows whose target is `ignore_index` count in neither; with no such row both are 0. Logits are fp32.
This reference materialises the (N, V) logits; the Triton version streams the vocabulary in chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = targets != ignore_index
    logits = hidden[keep] @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; fp64 stays
    count = keep.sum().clamp(min=1)
    # cross_entropy's fused backward is far cheaper than differentiating an explicit logsumexp; the z-loss
    # graph below is only walked when a caller puts z into its loss.
    ce = F.cross_entropy(logits, targets[keep], reduction="sum") / count
    z = torch.logsumexp(logits, dim=-1).pow(2).sum() / count
    return ce, z
