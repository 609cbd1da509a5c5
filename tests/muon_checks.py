"""A check shared by the one-process and distributed Muon tests."""

from __future__ import annotations

import math

import torch


def assert_muon_update(before: torch.Tensor, after: torch.Tensor, lr: float, weight_decay: float, view) -> None:
    """The applied update is Muon's: each matrix's update has a flat spectrum at 0.2 sqrt(max(m, n)): no singular
    value above 1.3x that, the median above 0.5x (directions the gradient barely has stay small after five
    Newton-Schulz steps). An SGD update is orders of magnitude smaller; AdamW's spectrum spreads to about 2x."""
    count, rows, cols = view
    update = (before * (1 - lr * weight_decay) - after) / lr
    singular = torch.linalg.svdvals(update.reshape(count, rows, cols).double()) / (0.2 * math.sqrt(max(rows, cols)))
    assert singular.median() > 0.5 and singular.max() < 1.3, (singular.median(), singular.max())
