"""AdamW with decoupled weight decay on matrices only.

Norm weights and biases (every 1-D parameter, and every parameter named *bias) never decay; the token embedding and the output head
decay only with `train.decay_embeddings`. Decay is decoupled (AdamW): p <- p - lr * weight_decay * p.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kmodel.config import TrainConfig

EMBEDDING_NAMES = ("embed_tokens.weight", "lm_head.weight")


def decays(name: str, param: torch.Tensor, decay_embeddings: bool) -> bool:
    if param.ndim < 2 or name.endswith("bias"):  # stacked expert biases are 2-D
        return False
    return decay_embeddings or name not in EMBEDDING_NAMES


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
    return torch.optim.AdamW(param_groups(named_params, train), lr=train.lr, betas=(train.beta1, train.beta2),
                             eps=train.adam_eps)


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    return adamw(model.named_parameters(), train)
