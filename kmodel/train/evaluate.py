"""Held-out evaluation: loss, perplexity and bits per byte of a model on tokenized documents.

Bits per byte = total cross-entropy in bits / UTF-8 bytes of the text, so models with different tokenizers
compare: every token after the first is predicted once (the EOS ending each document included) in windows
of seq_len. When only the first `max_batches` batches are evaluated, the bytes are the file's bytes scaled
by the share of its tokens that were predicted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch

from kmodel.data import TokenizedDocs, sequential_batches


def _summary(nats: float, tokens: int, text_bytes: float) -> dict[str, Any]:
    loss = nats / tokens
    return {
        "tokens": tokens,
        "bytes": text_bytes,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        "bits_per_byte": nats / math.log(2) / text_bytes,
    }


@torch.no_grad()
def evaluate_docs(
    model: torch.nn.Module,
    docs: TokenizedDocs,
    seq_len: int,
    batch_size: int,
    pad_id: int,
    amp_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, tokens = 0.0, 0
    autocast = torch.autocast(device.type, amp_dtype) if amp_dtype else nullcontext()
    try:
        for batch in sequential_batches(docs, seq_len, batch_size, pad_id, max_batches):
            batch = batch.to(device)
            with autocast:
                out = model(batch.input_ids, batch.labels)
            count = batch.num_tokens
            nats += out.lm_loss.double().item() * count
            tokens += count
    finally:
        model.train(was_training)
    covered_bytes = docs.text_bytes * tokens / (len(docs.tokens) - 1)
    return _summary(nats, tokens, covered_bytes)


def combine_results(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted loss and byte-weighted bits per byte over several evaluated files."""
    results = list(results)
    nats = sum(r["loss"] * r["tokens"] for r in results)
    return _summary(nats, sum(r["tokens"] for r in results), sum(r["bytes"] for r in results))
