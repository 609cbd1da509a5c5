"""Per-layer activation checkpointing, applied from outside the model (`train.activation_checkpointing`).

Each DecoderLayer (the MTP block's included) keeps only its input during the forward pass; backward runs the
layer again to rebuild what it needs (torch.utils.checkpoint, non-reentrant). The layer's `forward` is
replaced on the instance, so parameter names, state dicts and checkpoints are unchanged.

The recomputation must not count routed tokens twice: MoE layers add each forward's tokens per expert to
their `load` buffer (the aux-loss-free balancing signal), so while a layer is being recomputed its MoE
counts into a scratch buffer that is thrown away.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kmodel.model.decoder import DecoderLayer
from kmodel.model.moe import MoE


@contextmanager
def _load_counting_discarded(layer: nn.Module):
    moes = [m for m in layer.modules() if isinstance(m, MoE)]
    kept = [m.load for m in moes]
    for moe in moes:
        moe.load = torch.zeros_like(moe.load)
    try:
        yield
    finally:
        for moe, load in zip(moes, kept):
            moe.load = load


def _checkpointed(layer: DecoderLayer):
    plain = layer.forward

    def forward(*args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return plain(*args, **kwargs)
        calls = 0

        def run(*inner_args):
            nonlocal calls
            calls += 1
            if calls == 1:
                return plain(*inner_args, **kwargs)
            with _load_counting_discarded(layer):  # the backward-time recomputation
                return plain(*inner_args, **kwargs)

        return checkpoint(run, *args, use_reentrant=False)

    return forward


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every DecoderLayer of `model`; returns how many were wrapped (0 means none found)."""
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for layer in layers:
        if "forward" in vars(layer):
            raise RuntimeError(f"{type(layer).__name__} already has activation checkpointing (or another forward patch)")
        layer.forward = _checkpointed(layer)
    return len(layers)
