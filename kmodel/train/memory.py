"""Memory a training process holds, by category, and the meter of the activations autograd saves.

The categories are named once, here: the planner's JSON (kmodel.plan), the trainer's `{"kind": "memory"}`
record in metrics.jsonl and the run summary all use them.

    params        the weights the process holds (its ZeRO-3 partition, its expert-parallel shard)
    grads         the gradients it holds at the step boundary (full, or its ZeRO-2/3 partition)
    optimizer     fp32 master weights and optimizer moments (its ZeRO partition)
    activations   the peak of the tensors autograd keeps for backward during one micro-batch

A record is `{"kind": "memory", "step": S, "rank": R, "params_bytes": ..., "grads_bytes": ...,
"optimizer_bytes": ..., "activations_peak_bytes": ...}`; on CUDA it adds `cuda_max_allocated_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

CATEGORIES = ("params", "grads", "optimizer", "activations")


def record_key(category: str) -> str:
    """The metrics.jsonl key of a category: `<category>_bytes`, the activations' `activations_peak_bytes`."""
    return "activations_peak_bytes" if category == "activations" else f"{category}_bytes"


def tensors_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the tensors, each distinct one (same memory, same size) counted once."""
    seen: set[tuple[int, int, int]] = set()
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        key = (t.data_ptr(), t.numel(), t.element_size())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class _Saved:
    """One tensor autograd keeps; counted while this object lives (autograd drops it after backward uses it)."""

    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: SavedActivations, tensor: torch.Tensor):
        self.meter, self.tensor = meter, tensor
        storage = tensor.untyped_storage()
        self.key = (storage.data_ptr(), tensor.device)
        meter._hold(self.key, storage.nbytes())

    def __del__(self):
        self.meter._release(self.key)


class SavedActivations:
    """`with SavedActivations() as meter:` around a micro-batch's forward and backward; `meter.peak_bytes` is
    the most memory the saved tensors held at once. Each storage is counted once however many tensors view it;
    weights (parameters and views of them) are not activations and are left out."""

    def __init__(self):
        self.peak_bytes = 0
        self._live = 0
        self._held: dict[Any, list[int]] = {}  # storage -> [bytes, references]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
            return tensor
        return _Saved(self, tensor)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _hold(self, key, nbytes: int) -> None:
        entry = self._held.setdefault(key, [nbytes, 0])
        if entry[1] == 0:
            self._live += nbytes
            self.peak_bytes = max(self.peak_bytes, self._live)
        entry[1] += 1

    def _release(self, key) -> None:
        entry = self._held[key]
        entry[1] -= 1
        if entry[1] == 0:
            self._live -= entry[0]
            del self._held[key]
