"""The memory accounting the engine's `{"kind": "memory"}` records use, and the summary line that shows them."""

from __future__ import annotations

import json

import torch
from torch import nn

from kmodel.train.memory import CATEGORIES, SavedActivations, record_key, tensors_bytes
from kmodel.train.summary import summarize


def test_saved_activations_peak_counts_each_storage_once_and_no_weights():
    weight = nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64, requires_grad=True)
    with SavedActivations() as meter:
        y = x @ weight  # saves x (an activation) and the weight (not one)
        z = y.sin() * y.view(-1).view(8, 64).cos()  # y's storage saved three times: counted once
        assert meter._live == x.numel() * 4 + y.numel() * 4 * 3  # x, y, sin(y) and cos(y) of y's size
        z.sum().backward()
    assert meter.peak_bytes == x.numel() * 4 + 3 * y.numel() * 4
    assert meter._live == 0  # backward released everything it kept


def test_tensors_bytes_counts_shared_memory_once():
    a = torch.zeros(10)
    assert tensors_bytes([a, a, a[:], None, torch.zeros(0)]) == 40
    assert tensors_bytes([a, a[:5]]) == 60  # a different extent is a different tensor


def test_summary_shows_the_largest_memory_over_the_ranks(tmp_path):
    records = [{"kind": "memory", "step": 1, "rank": r, **{record_key(c): (r + 1) * 2**20 for c in CATEGORIES}}
               for r in range(4)]
    records.append({"kind": "train", "step": 1, "tokens": 10, "loss": 1.0, "lm_loss": 1.0, "tokens_per_s": 5.0,
                    "step_seconds": 2.0, "skipped": False, "mfu": None})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    line = next(line for line in summarize(tmp_path).splitlines() if line.startswith("memory"))
    assert line == ("memory         params 4.0, grads 4.0, optimizer 4.0, activations 4.0 MiB "
                    "(largest of 4 rank(s), step 1)")
