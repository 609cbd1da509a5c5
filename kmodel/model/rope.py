"""Rotary position embedding, rotate-half convention (the layout Hugging Face's Llama family uses), with
optional YaRN context extension."""

from __future__ import annotations

import math

import torch

from kmodel.config import RopeScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, scaling: RopeScaling, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """YaRN's per-pair inverse frequencies and its cos/sin multiplier (the attention factor)."""
    exponents = torch.arange(0, dim, 2, dtype=dtype) / dim
    extrapolated = 1.0 / theta**exponents
    interpolated = extrapolated / scaling.factor

    def pair_index(rotations: float) -> float:
        # the dim pair whose wavelength fits `rotations` times into the original context
        return dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(scaling.beta_fast), pair_index(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-point ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=dtype) - low) / (high - low)).clamp(0, 1)  # 0: keep, 1: interpolate
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)

    factor = scaling.attention_factor
    if factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            factor = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        else:
            factor = yarn_mscale(scaling.factor)
    return inv_freq, factor


def yarn_softmax_scale(scaling: RopeScaling | None) -> float:
    """The multiplier DeepSeek-V3's convention puts on the softmax scale when `mscale_all_dim` is set."""
    if scaling is None or not scaling.mscale_all_dim:
        return 1.0
    return yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, head_dim), computed in `dtype` (fp32 unless the model is fp64)."""
    if scaling is None:
        inv_freq, factor = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)), 1.0
    else:
        inv_freq, factor = yarn_inv_freq(head_dim, theta, scaling, dtype)
    angles = positions.to(dtype)[..., None] * inv_freq.to(positions.device)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * factor, angles.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by per-position angles cos/sin (seq, head_dim) or (batch, seq, head_dim)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
