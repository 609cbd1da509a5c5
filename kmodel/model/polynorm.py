"""PolyNorm (arXiv 2411.03884; Motif's MLP activation): a learned mix of normalised powers of its input,

    polynorm(x) = w0 N(x^3) + w1 N(x^2) + w2 N(x) + b,   N(z) = z / sqrt(mean(z^2) + eps) over the last dim,

used in place of SiLU on the gate of the gated MLP: down(polynorm(gate(x)) * up(x)). The weights start at 1/3
each and the bias at 0 (Motif's initialisation)."""

from __future__ import annotations

import torch
from torch import nn

# Motif's PolyNorm eps (its modeling code's default).
POLYNORM_EPS = 1e-6
POLYNORM_INIT = 1.0 / 3.0


def polynorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = POLYNORM_EPS) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, torch.float32)  # cubes overflow bf16 early: compute in fp32 at least
    z = x.to(dtype)

    def normed(p: torch.Tensor) -> torch.Tensor:
        return p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + eps)

    w = weight.to(dtype)
    out = w[0] * normed(z**3) + w[1] * normed(z**2) + w[2] * normed(z) + bias.to(dtype)
    return out.to(x.dtype)


class PolyNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), POLYNORM_INIT))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return polynorm(x, self.weight, self.bias)
