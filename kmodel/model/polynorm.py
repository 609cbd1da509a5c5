"""PolyNorm (arXiv 2411.03884; Motif's MLP activation): a learned mix of normalised powers of its input,

    polynorm(x) = s (f(w0) N(x^3) + f(w1) N(x^2) + f(w2) N(x) + clamp(b)),   N(z) = z / sqrt(mean(z^2) + eps),

used in place of SiLU on the gate of the gated MLP: down(polynorm(gate(x)) * up(x)). Motif-2 uses it plainly
(f the identity, no clamp, s = 1). Motif-3 passes the weights through a sigmoid (`polynorm_sigmoid_weight`),
scales the output (`polynorm_output_scale`, 0.5) and, in its routed experts only, gives every expert its own
coefficients ("grouped PolyNorm", `GroupedPolyNorm`) with the bias clamped to +-`polynorm_bias_clamp` (0.5).
The formula itself lives in the kernels package (kmodel.kernels.moe.reference.polynorm); this module owns the
parameters and their transform into the four coefficients the formula takes."""

from __future__ import annotations

import math

import torch
from torch import nn

from kmodel.config import ModelConfig
from kmodel.kernels.moe.reference import polynorm


def initial_polynorm_weight(sigmoid_weight: bool) -> float:
    """Every power starts with coefficient 1/3 (Motif's initialisation): w = 1/3, or logit(1/3) = -ln 2 when the
    coefficient is sigmoid(w)."""
    return -math.log(2.0) if sigmoid_weight else 1.0 / 3.0


def polynorm_coefficients(
    weight: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig, *, routed: bool = False
) -> torch.Tensor:
    """(..., 3) weights and (..., 1) biases -> the (..., 4) coefficients of kernels' polynorm, fp32 at least."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w, b = weight.to(dtype), bias.to(dtype)
    if cfg.polynorm_sigmoid_weight:
        w = torch.sigmoid(w)
    if routed and cfg.polynorm_bias_clamp is not None:
        b = b.clamp(-cfg.polynorm_bias_clamp, cfg.polynorm_bias_clamp)
    return torch.cat((w, b), dim=-1) * cfg.polynorm_output_scale


class PolyNorm(nn.Module):
    """One set of coefficients (dense MLPs, shared experts). Routed experts keep theirs in `Experts`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(3))
        self.bias = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return polynorm(x, polynorm_coefficients(self.weight, self.bias, self.cfg))
