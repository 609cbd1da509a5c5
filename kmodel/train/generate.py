"""Text generation with the KV cache: one prefill of the prompt, then one token per forward, or several with
self-speculative decoding (`speculative="mtp"`).

The prompt is preceded by EOS, the token every training document follows, so the model reads it as the
start of a document. Sliding-window layers keep only the keys their window can still reach (LayerCache).
Sampling: temperature <= 0 is greedy; otherwise softmax(logits / temperature), cut to the smallest set of
tokens whose probability reaches top_p, drawn with a generator seeded by `seed` (same seed, same text).

Self-speculative decoding (greedy only): the model's own MTP depths draft the next D tokens, one main forward
scores them all, and the longest prefix the main model would itself have chosen is kept, plus the main
model's token after it. The output is therefore plain greedy decoding's, in fewer main forwards. Each MTP
depth keeps its own cache and recomputes, once the tokens are known, the positions it first saw with drafted
tokens, so every draft is exactly what the training-time MTP forward would predict there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kmodel.model.attention import LayerCache


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
    check_length(model, prompt_ids, max_new_tokens)
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


def check_length(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    limit = model.cfg.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({limit})"
        )


@dataclass
class RewindableCache(LayerCache):
    """A layer cache whose newest `spare` entries can be dropped again: sliding layers keep `spare` keys
    beyond their window (the attention mask still hides them), so rewinding never loses a key in reach."""

    spare: int = 0

    def trim(self, window: int | None) -> None:
        super().trim(None if window is None else window + self.spare)

    def rewind(self, end: int) -> None:
        """Forget the entries at positions >= end (positions only grow along the cache)."""
        if self.positions is not None:
            keep = int((self.positions < end).sum())
            self.keys, self.values, self.positions = self.keys[:, :keep], self.values[:, :keep], self.positions[:keep]


@dataclass
class SpeculativeStats:
    forwards: int = 0  # main-model forwards, the prefill included
    drafted: int = 0  # draft tokens proposed to the main model
    accepted: int = 0  # of those, the ones the main model kept
    tokens: int = 0  # new tokens produced

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def summary(self) -> str:
        return (
            f"speculative mtp: {self.tokens} tokens in {self.forwards} forwards "
            f"({self.tokens_per_forward:.2f} tokens/forward), {self.accepted}/{self.drafted} drafts accepted "
            f"({self.acceptance_rate:.1%})"
        )


class MTPDrafter:
    """Drafts with the model's MTP depths. Depth k's element i fuses depth k-1's hidden state at i with the
    embedding of token i + k and predicts token i + k + 1 (element i sits at position i, as in training).
    `done[k]` counts depth k's committed elements (those whose tokens are all known); `pending[k]` holds depth k's
    committed outputs that depth k + 1 has not consumed yet, elements done[k + 1] .. done[k] - 1, so memory and
    copying stay bounded by the drafts in flight, not the text length. Elements that involve drafted tokens are
    computed on top of the cache and rewound afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.depth = len(model.mtp)
        self.caches = [RewindableCache(spare=self.depth) for _ in range(self.depth)]
        self.done = [0] * (self.depth + 1)  # [0]: the main model's
        self.pending: list[torch.Tensor | None] = [None] * self.depth

    def commit_main(self, hidden: torch.Tensor) -> None:
        """Main-model hidden states of the newly processed positions, in order."""
        self._commit(0, hidden)

    def _commit(self, k: int, out: torch.Tensor) -> None:
        self.done[k] += out.shape[1]
        if k < self.depth:  # the last depth's outputs feed nothing
            self.pending[k] = out if self.pending[k] is None else torch.cat((self.pending[k], out), dim=1)

    def draft(self, tokens: list[int], count: int) -> list[int]:
        """`count` (<= depth) greedy drafts of the tokens after `tokens`, whose last token the main model has
        not processed yet (all the ones before it, it has)."""
        model, device = self.model, self.pending[0].device
        m = len(tokens) - 1
        drafts: list[int] = []
        speculative = self.pending[0][:, :0]
        for k in range(1, count + 1):
            start = self.done[k]  # first element not yet computed
            first_speculative = max(start, m - k + 1)
            previous = torch.cat((self.pending[k - 1], speculative), dim=1)  # elements start..m-1
            ids = (tokens + drafts)[start + k : m + k]
            positions = torch.arange(start, m, device=device)
            out, _ = model.mtp[k - 1](
                previous,
                model.embed(torch.tensor([ids], device=device)),
                model.mtp_rope(positions),
                positions,
                cache=self.caches[k - 1],
            )
            self.caches[k - 1].rewind(first_speculative)
            committed = first_speculative - start
            self.pending[k - 1] = self.pending[k - 1][:, committed:]  # consumed by depth k for good
            self._commit(k, out[:, :committed])
            speculative = out[:, committed:]
            drafts.append(int(model.logits(out[:, -1:], model.mtp[k - 1].norm)[0, -1].argmax()))
        return drafts


@torch.no_grad()
def generate_ids_speculative(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    stop_id: int | None = None,
    stats: SpeculativeStats | None = None,
) -> list[int]:
    """Greedy continuation of `prompt_ids`, identical to `generate_ids(..., temperature=0)`, drafting with
    the model's MTP depths. `stats` (if given) receives the forwards, drafts and acceptances."""
    if getattr(model, "mtp", None) is None:
        raise ValueError(
            "speculative decoding with MTP needs a model with MTP depths (model.num_nextn_predict_layers is 0)"
        )
    check_length(model, prompt_ids, max_new_tokens)
    stats = SpeculativeStats() if stats is None else stats
    device = next(model.parameters()).device
    model.eval()
    drafter = MTPDrafter(model)
    cache = [RewindableCache(spare=drafter.depth) for _ in model.layers]

    def main_forward(ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + len(ids), device=device)
        _, hidden, _ = model.backbone(torch.tensor([ids], device=device), positions, cache=cache)
        stats.forwards += 1
        return hidden, model.logits(hidden)[0].argmax(dim=-1).tolist()

    if max_new_tokens <= 0:
        return []
    tokens = list(prompt_ids)
    hidden, choices = main_forward(tokens, 0)
    drafter.commit_main(hidden)
    tokens.append(choices[-1])  # tokens[-1] is always known but not yet processed by the main model
    new = [choices[-1]]
    while len(new) < max_new_tokens and stop_id not in new:
        m = len(tokens) - 1
        drafts = drafter.draft(tokens, min(drafter.depth, max_new_tokens - len(new) - 1))
        hidden, choices = main_forward([tokens[-1]] + drafts, m)
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
            accepted += 1
        for layer_cache in cache:
            layer_cache.rewind(m + accepted + 1)
        drafter.commit_main(hidden[:, : accepted + 1])
        stats.drafted += len(drafts)
        stats.accepted += accepted
        kept = drafts[:accepted] + [choices[accepted]]
        tokens += kept
        new += kept
    if stop_id in new:
        new = new[: new.index(stop_id)]
    stats.tokens = len(new)
    return new


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    speculative: str | None = None,
    stats: SpeculativeStats | None = None,
    **sampling,
) -> str:
    """The continuation of `prompt` as text (without the prompt). speculative="mtp": greedy self-speculative
    decoding with the MTP depths (sampling must be greedy, temperature <= 0)."""
    prompt_ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    if speculative is None:
        ids = generate_ids(model, prompt_ids, max_new_tokens, stop_id=tokenizer.eos_id, **sampling)
    elif speculative == "mtp":
        if sampling.get("temperature", 0.0) > 0:
            raise ValueError("speculative decoding 'mtp' is greedy: set temperature to 0")
        ids = generate_ids_speculative(model, prompt_ids, max_new_tokens, stop_id=tokenizer.eos_id, stats=stats)
    else:
        raise ValueError(f"unknown speculative method {speculative!r}; known: 'mtp'")
    return tokenizer.decode(ids)
