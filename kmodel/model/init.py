"""Deterministic initialisation: every parameter is drawn from its own generator seeded by (seed, name).

The initial weights therefore depend only on the seed, the config and the parameter names — not on
module construction order, device or world size — and anyone can recompute them (the provenance
verifier does). Draws happen on the CPU in fp32 so every machine gets the same bits.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from kmodel.model.norm import RMSNorm


def parameter_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"kmodel-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_value(name: str, shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    """The initial value of a randomly initialised parameter `name`: N(0, std) from its own generator."""
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=generator) * std


def constant_parameters(model: nn.Module) -> dict[str, float]:
    """Parameters that start at a constant instead: norm weights at the identity scale (1, or 0 for a
    `plus_one` norm, which applies 1 + w) and biases (`bias`, `*_bias`) at 0."""
    constants = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, RMSNorm):
            constants[prefix + "weight"] = 0.0 if module.plus_one else 1.0
        for name, _ in module.named_parameters(recurse=False):
            if name == "bias" or name.endswith("_bias"):
                constants[prefix + name] = 0.0
    return constants


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float) -> None:
    constants = constant_parameters(model)
    for name, param in model.named_parameters():
        if name in constants:
            param.fill_(constants[name])
        else:
            param.copy_(initial_value(name, param.shape, seed, std))
    for name, buf in model.named_buffers():
        buf.zero_()  # router correction biases and load counters start at zero
