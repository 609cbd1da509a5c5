"""Plain-PyTorch LM-head projection + cross-entropy + z-loss.

linear_cross_entropy(hidden (N, H), weight (V, H), targets (N,)) returns (ce, z):
  ce = mean over non-ignored rows of -log softmax(hidden @ weight.T)[target]
  z  = mean over the same rows of logsumexp(logits) ** 2   (z-loss on the output logits)
Rows whose target is `ignore_index` count in neither; with no such row both are 0. Logits are fp32.
This reference materialises the (N, V) logits; the Triton version streams the vocabulary in chunks.
"""

from __future__ import annotations

import torch


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = targets != ignore_index
    logits = (hidden[keep] @ weight.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets[keep, None]).squeeze(1)
    count = keep.sum().clamp(min=1)
    return (lse - target_logit).sum() / count, lse.pow(2).sum() / count
