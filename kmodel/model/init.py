"""Deterministic initialisation: every parameter is drawn from its own generator seeded by (seed, name).

The initial weights therefore depend only on the seed, the config and the parameter names — not on
module construction order, device or world size — and anyone can recompute them (the provenance
verifier does). Draws happen on the CPU in fp32 so every machine gets the same bits.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def parameter_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"kmodel-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_value(name: str, shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    """The initial value of parameter `name`: ones for norm weights, N(0, std) for everything else."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float) -> None:
    for name, param in model.named_parameters():
        param.copy_(initial_value(name, param.shape, seed, std))
    for name, buf in model.named_buffers():
        buf.zero_()  # router correction biases and load counters start at zero
