"""The optimizer a recipe asks for (`train.optimizer`): AdamW, or Muon on the hidden matrices with AdamW on
the rest. `build_optimizer` is the single entry; engines that split the parameters (ZeRO's dense part, the
expert shards) call `optimizer_for` on their share, so every part runs the same rule.

Weight decay is decoupled (p <- p - lr * weight_decay * p). Norm weights and biases (every 1-D parameter, and
every parameter named *bias) never decay; the token embedding and the output head decay only with
`train.decay_embeddings`.

The Muon split (`optimizer: muon`): Muon takes every weight matrix inside the network (attention and MLA
projections, dense MLPs, shared experts, every routed expert's matrices, MTP's projection); AdamW keeps the
token embedding, the LM head, the routers (`*.mlp.gate.weight`), norms, biases, attention sinks and anything
else that is not a matrix: the standard split (Moonlight, Kimi K2). `train.muon_params` moves matrices
matching a glob to Muon, `train.adamw_params` keeps matrices matching a glob on AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch

from kmodel.config import TrainConfig
from kmodel.train.muon import Muon, matrix_view

EMBEDDING_NAMES = ("embed_tokens.weight", "lm_head.weight")
ROUTER_SUFFIX = ".mlp.gate.weight"


def decays(name: str, param: torch.Tensor, decay_embeddings: bool) -> bool:
    if param.ndim < 2 or name.endswith("bias"):  # stacked expert biases are 2-D
        return False
    return decay_embeddings or name not in EMBEDDING_NAMES


def param_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape (ZeRO-3 leaves a partitioned parameter 1-D and keeps it in ds_shape)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def uses_muon(name: str, param: torch.Tensor, train: TrainConfig) -> bool:
    """Whether `train.optimizer: muon` updates this parameter with Muon (else AdamW): see the module doc."""
    if len(param_shape(param)) < 2 or name.endswith("bias"):
        return False
    if any(fnmatchcase(name, pattern) for pattern in train.adamw_params):
        return False
    if any(fnmatchcase(name, pattern) for pattern in train.muon_params):
        return True
    return name not in EMBEDDING_NAMES and not name.endswith(ROUTER_SUFFIX)


def param_groups(named_params: Iterable[tuple[str, torch.Tensor]], train: TrainConfig) -> list[dict]:
    """One group that decays, one that does not (empty groups left out)."""
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            (decay if decays(name, param, train.decay_embeddings) else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def adamw(named_params: Iterable[tuple[str, torch.Tensor]], train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over (name, tensor) pairs, grouped by `param_groups`."""
    return adamw_over_groups(param_groups(named_params, train), train)


def adamw_over_groups(groups: list[dict], train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over groups already formed (e.g. `param_groups` of the full tensors, holding their shards)."""
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.adam_eps)


def muon(named_params: Iterable[tuple[str, torch.Tensor]], train: TrainConfig) -> Muon:
    """Muon over the matrices `uses_muon` picks (one group, decayed), AdamW groups as `param_groups` for the rest."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    matrices = [(n, p) for n, p in named if uses_muon(n, p, train)]
    groups = []
    if matrices:
        groups.append({"params": [p for _, p in matrices], "muon": True, "weight_decay": train.weight_decay,
                       "views": [matrix_view(n, param_shape(p)) for n, p in matrices]})
    chosen = {id(p) for _, p in matrices}
    groups += [{**g, "muon": False} for g in param_groups([(n, p) for n, p in named if id(p) not in chosen], train)]
    return muon_over_groups(groups, train)


def muon_over_groups(groups: list[dict], train: TrainConfig) -> Muon:
    """Muon over groups already formed (`"muon"` and, for Muon groups, `"views"` set), with the recipe's settings."""
    return Muon(groups, lr=train.lr, momentum=train.muon_momentum, nesterov=train.muon_nesterov,
                ns_steps=train.muon_ns_steps, betas=(train.beta1, train.beta2), eps=train.adam_eps)


def state_keys(group: dict) -> tuple[str, ...]:
    """The per-parameter state tensors a group's parameters have (what a checkpoint saves for them)."""
    return ("momentum_buffer",) if group.get("muon") else ("exp_avg", "exp_avg_sq")


def optimizer_for(named_params: Iterable[tuple[str, torch.Tensor]], train: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer (`train.optimizer`) over these (name, tensor) pairs."""
    return muon(named_params, train) if train.optimizer == "muon" else adamw(named_params, train)


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    return optimizer_for(model.named_parameters(), train)
