"""RMSNorm module; the arithmetic lives in the kernels package (reference or Triton)."""

from __future__ import annotations

import torch
from torch import nn

from kmodel.config import ModelConfig
from kmodel.kernels.norm import reference


class RMSNorm(nn.Module):
    """y = weight * x / rms(x). With `plus_one` (Gemma style) the stored weight w is applied as (1 + w), so a
    zero weight is the identity scale and weight decay pulls the scale toward 1 rather than 0."""

    def __init__(self, dim: int, eps: float, *, plus_one: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))
        self.eps = eps
        self.plus_one = plus_one
        self.kernel = reference  # replaced by Model.use_kernels

    @classmethod
    def of(cls, cfg: ModelConfig, dim: int) -> "RMSNorm":
        """The norm every RMSNorm of a model is: its eps and weight convention come from the config."""
        return cls(dim, cfg.rms_norm_eps, plus_one=cfg.norm_weight_plus_one)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.rms_norm(x, 1.0 + self.weight if self.plus_one else self.weight, self.eps)
