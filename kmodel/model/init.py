"""Deterministic initialisation: every parameter is drawn from its own generator seeded by (seed, name).

The initial weights therefore depend only on the seed, the config and the parameter names — not on
module construction order, device or world size — and anyone can recompute them (the provenance
verifier does). Draws happen on the CPU in fp32 so every machine gets the same bits. Routed experts are
drawn one expert at a time (name `<tensor>.<global expert id>`), so a rank holding a shard of the experts
draws exactly its rows of the full tensor without ever materialising the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from kmodel.model.hyper_connections import HC_SCALE_INIT, HyperConnection
from kmodel.model.moe import Experts
from kmodel.model.norm import RMSNorm
from kmodel.model.polynorm import PolyNorm, initial_polynorm_weight

# Parameters drawn with their own standard deviation instead of initializer_range: differential attention's
# lambda vectors (the Differential Transformer's N(0, 0.1)).
STD_BY_NAME = {"lambda_q1": 0.1, "lambda_k1": 0.1, "lambda_q2": 0.1, "lambda_k2": 0.1}


def parameter_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"kmodel-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_value(name: str, shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    """The initial value of a randomly initialised parameter `name`: N(0, std) from its own generator."""
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=generator) * std


def constant_parameters(model: nn.Module) -> dict[str, float]:
    """Parameters that start at a constant instead: norm weights at the identity scale (1, or 0 for a
    `plus_one` norm, which applies 1 + w), PolyNorm's weights (routed experts' too) at coefficient 1/3 and biases
    (`bias`, `*_bias`) at 0."""
    constants = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, RMSNorm):
            constants[prefix + "weight"] = 0.0 if module.plus_one else 1.0
        if isinstance(module, PolyNorm):
            constants[prefix + "weight"] = initial_polynorm_weight(module.cfg.polynorm_sigmoid_weight)
        if isinstance(module, HyperConnection):
            constants[prefix + "scale"] = HC_SCALE_INIT
        if isinstance(module, Experts) and module.polynorm_weight is not None:
            constants[prefix + "polynorm_weight"] = initial_polynorm_weight(module.cfg.polynorm_sigmoid_weight)
        for name, _ in module.named_parameters(recurse=False):
            if name == "bias" or name.endswith("_bias"):
                constants[prefix + name] = 0.0
    return constants


def expert_offsets(model: nn.Module) -> dict[str, int]:
    """Stacked routed-expert parameters -> the global id of their first row."""
    return {
        f"{module_name}.{name}": module.first_expert
        for module_name, module in model.named_modules()
        if isinstance(module, Experts)
        for name, _ in module.named_parameters(recurse=False)
    }


def initial_expert_value(name: str, shape: torch.Size, first: int, seed: int, std: float) -> torch.Tensor:
    """Rows [first, first + shape[0]) of stacked expert parameter `name`, each expert from its own generator."""
    return torch.stack([initial_value(f"{name}.{first + j}", shape[1:], seed, std) for j in range(shape[0])])


def initial_values(model: nn.Module, seed: int, std: float, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, initial value) of the parameters `names` (default: all, in model order), one tensor at a time.
    `model` only supplies names and shapes, so it may live on the meta device."""
    params = dict(model.named_parameters())
    constants = constant_parameters(model)
    experts = expert_offsets(model)
    for name in params if names is None else names:
        shape = params[name].shape
        if name in constants:
            yield name, torch.full(shape, constants[name])
        elif name in experts:
            yield name, initial_expert_value(name, shape, experts[name], seed, std)
        else:
            yield name, initial_value(name, shape, seed, STD_BY_NAME.get(name.rsplit(".", 1)[-1], std))


def initial_state(model: nn.Module, seed: int, std: float) -> Iterator[tuple[str, torch.Tensor]]:
    """The initial state_dict in name order, one tensor at a time (buffers start at zero): what the ledger's
    initial-weights hash covers, recomputable for any model size without building the model."""
    state = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters())
    names = sorted(state)
    values = initial_values(model, seed, std, [n for n in names if n in params])
    for name in names:
        yield next(values) if name in params else (name, torch.zeros(state[name].shape, dtype=state[name].dtype))


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float) -> None:
    params = dict(model.named_parameters())
    for name, value in initial_values(model, seed, std):
        params[name].copy_(value)
