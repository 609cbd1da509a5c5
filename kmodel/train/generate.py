"""Text generation with the KV cache: one prefill of the prompt, then one token per forward.

The prompt is preceded by EOS, the token every training document follows, so the model reads it as the
start of a document. Sliding-window layers keep only the keys their window can still reach (LayerCache).
Sampling: temperature <= 0 is greedy; otherwise softmax(logits / temperature), cut to the smallest set of
tokens whose probability reaches top_p, drawn with a generator seeded by `seed` (same seed, same text).
"""

from __future__ import annotations

from typing import Any

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from a (vocab,) row of logits."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass before it is below top_p: the first token always stays.
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """New token ids continuing `prompt_ids` (stopping early at `stop_id`)."""
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    limit = model.cfg.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({limit})"
        )
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)  # CPU generator: the same draws on every device
    model.eval()
    cache = model.new_cache()
    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids, position_ids=positions, cache=cache).logits[0, -1]
        token = sample_next(logits.cpu(), temperature, top_p, generator)
        if token == stop_id:
            break
        new.append(token)
        next_position = int(positions[-1]) + 1
        ids = torch.tensor([[token]], device=device)
        positions = torch.tensor([next_position], device=device)
    return new


def generate_text(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64, **sampling) -> str:
    """The continuation of `prompt` as text (without the prompt)."""
    prompt_ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    return tokenizer.decode(generate_ids(model, prompt_ids, max_new_tokens, stop_id=tokenizer.eos_id, **sampling))
