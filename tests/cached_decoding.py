"""Shared by the model tests: decoding through the KV cache, a prompt and then one token a step."""

import torch


def cached_logits(model, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, list]:
    """The logits of ids fed through a fresh cache (the first `prompt` tokens at once, then one token a step),
    and that cache."""
    cache = model.new_cache()
    steps = [model(ids[:, :prompt], cache=cache).logits]
    for pos in range(prompt, ids.shape[1]):
        steps.append(model(ids[:, pos : pos + 1], position_ids=torch.tensor([pos]), cache=cache).logits)
    return torch.cat(steps, dim=1), cache
