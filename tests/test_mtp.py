"""Multi-token prediction of any depth: the per-depth losses against a direct computation, per-depth loss
weights, document masking, and self-speculative decoding with the MTP depths (identical to plain greedy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kmodel.config import ConfigError, load_config
from kmodel.model import build_model
from kmodel.train.generate import (
    MTPDrafter,
    RewindableCache,
    SpeculativeStats,
    generate_ids,
    generate_ids_speculative,
)

TINY = "recipes/tiny-ko-moe.yaml"
SMALL = [
    "model.vocab_size=61",
    "model.hidden_size=32",
    "model.head_dim=8",
    "model.intermediate_size=48",
    "model.moe_intermediate_size=16",
    "model.sliding_window=3",
    "kernels.attention=torch",
    "kernels.moe=torch",
    "kernels.norm=torch",
    "kernels.loss=torch",
]


def small_cfg(depth: int, *extra: str):
    return load_config(TINY, SMALL + [f"model.num_nextn_predict_layers={depth}", *extra])


def depth_logits(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits of every MTP depth over a whole sequence, written out from the definition: depth k at position i
    takes [enorm(embedding of token i + k); hnorm(depth k-1's output at i)] through eh_proj and one decoder
    layer, then its own norm and the shared head."""
    seq = ids.shape[1]
    positions = torch.arange(seq)
    _, h, _ = model.backbone(ids, positions)
    cos, sin = model.rope_tables(positions)[model.cfg.layer_types[-1]]
    out = []
    for k, depth in enumerate(model.mtp, start=1):
        n = seq - k
        emb = model.embed_tokens(ids[:, k:])
        x = depth.eh_proj(torch.cat((depth.enorm(emb), depth.hnorm(h[:, :n])), dim=-1))
        h, _ = depth.block(x, (cos[:n], sin[:n]), positions[:n])
        out.append(depth.norm(h) @ model.head_weight.t())
    return out


def test_loss_of_each_depth_and_per_depth_weights():
    cfg = small_cfg(3, "model.mtp_loss_weights=[0.5,0.25,0.125]")
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels)
    expected = [
        F.cross_entropy(logits.flatten(0, 1), labels[:, k:].flatten(), ignore_index=-100)
        for k, logits in enumerate(depth_logits(model, ids), start=1)
    ]
    positions = torch.arange(12)
    embeds, hidden, _ = model.backbone(ids, positions)
    losses, _ = model.mtp_losses(hidden, embeds, labels, positions)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
    weighted = 0.5 * expected[0] + 0.25 * expected[1] + 0.125 * expected[2]
    torch.testing.assert_close(out.loss - out.lm_loss - out.aux_loss, weighted, rtol=1e-5, atol=1e-6)
    # Every depth's parameters receive a gradient.
    out.loss.backward()
    for k in range(3):
        assert model.mtp[k].eh_proj.weight.grad.abs().max() > 0, k


def test_default_weights_split_the_coefficient_and_bad_weights_name_the_key():
    assert small_cfg(4, "model.mtp_loss_coef=0.2").model.mtp_depth_weights == pytest.approx([0.05] * 4)
    with pytest.raises(ConfigError, match="mtp_loss_weights has 2 entries for num_nextn_predict_layers=3"):
        small_cfg(3, "model.mtp_loss_weights=[0.1,0.1]")


def test_mtp_targets_never_cross_a_document_boundary():
    """With documents [0..5) and [5..12): depth 2 at position 2 would predict token 5 (the next document's first
    token): masked. Changing the first document must not change the second document's MTP losses."""
    cfg = small_cfg(2)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0] * 5 + [1] * 7])
    labels = torch.roll(ids, -1, dims=1)
    labels[0, 4] = labels[0, -1] = -100  # the last token of each document has no target

    def second_document_losses(tokens):
        lab = labels.clone()
        lab[0, :5] = -100
        positions = torch.arange(12)
        embeds, hidden, _ = model.backbone(tokens, positions, cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))
        return torch.stack(model.mtp_losses(hidden, embeds, lab, positions, segments)[0])

    changed = ids.clone()
    changed[0, :5] = torch.randint(0, cfg.model.vocab_size, (5,), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(second_document_losses(changed), second_document_losses(ids), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(model(ids, labels, segment_ids=segments).loss)


@pytest.mark.parametrize("depth", [1, 3])
def test_drafts_equal_the_uncached_mtp_predictions(depth):
    """The drafter's caches (rewound after each draft) give exactly the training-time MTP prediction at the
    frontier, over two rounds (the second reuses the caches)."""
    cfg = small_cfg(depth)
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    drafter = MTPDrafter(model)
    cache = [RewindableCache(spare=depth) for _ in model.layers]
    processed = 0
    with torch.no_grad():
        for end in (6, 9):  # tokens[:end] known; the main model has processed all but the last
            fresh = torch.tensor([tokens[processed : end - 1]])
            _, hidden, _ = model.backbone(fresh, torch.arange(processed, end - 1), cache=cache)
            drafter.commit_main(hidden)
            processed = end - 1
            drafts = drafter.draft(tokens[:end], depth)
            sequence = torch.tensor([tokens[:end] + drafts[:-1]])
            for k, logits in enumerate(depth_logits(model, sequence), start=1):
                assert drafts[k - 1] == int(logits[0, end - 2].argmax()), (end, k)
            # what a depth keeps for the next is the few elements not yet consumed, not the whole text
            assert [p.shape[1] for p in drafter.pending] == [0] + [1] * (depth - 1)


def periodic_model(depth: int):
    """A tiny model trained for a few steps on one repeating 7-token cycle: its MTP depths learn to draft."""
    cfg = small_cfg(depth, "model.num_experts=0", "model.num_hidden_layers=2", "model.sliding_window_pattern=LG")
    model = build_model(cfg)
    cycle = torch.tensor([3, 14, 15, 9, 26, 5, 35])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        starts = torch.randint(0, 7, (4,), generator=generator)
        ids = torch.stack([cycle[(start + torch.arange(13)) % 7] for start in starts])
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), cycle


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_speculative_decoding_is_plain_greedy_in_fewer_forwards(depth):
    model, cycle = periodic_model(depth)
    prompt = cycle[:4].tolist()
    stats = SpeculativeStats()
    plain = generate_ids(model, prompt, 30, temperature=0)
    assert generate_ids_speculative(model, prompt, 30, stats=stats) == plain
    assert stats.tokens == 30 and stats.drafted > 0
    # Measured: every draft accepted, 1.88 / 2.73 / 4.29 tokens per forward for depths 1 / 2 / 4.
    assert stats.acceptance_rate > 0.8, stats.summary()
    assert stats.tokens_per_forward > 1 + 0.6 * depth, stats.summary()


@pytest.mark.parametrize("depth", [1, 3])
def test_speculative_decoding_of_an_untrained_model_is_still_plain_greedy(depth):
    """Drafts that are mostly rejected (random weights, sliding layers, MoE) still give plain greedy's output,
    also when stopping at a stop token and with a one-token prompt."""
    cfg = small_cfg(depth)
    model = build_model(cfg).eval()
    for prompt in ([7], [5, 7, 9, 11, 2]):
        plain = generate_ids(model, prompt, 14, temperature=0)
        assert generate_ids_speculative(model, prompt, 14) == plain
    stop = plain[6]
    assert generate_ids_speculative(model, prompt, 14, stop_id=stop) == plain[: plain.index(stop)]
    assert generate_ids_speculative(model, [7], 0) == []


def test_speculative_decoding_needs_mtp_depths():
    model = build_model(small_cfg(0)).eval()
    with pytest.raises(ValueError, match="num_nextn_predict_layers is 0"):
        generate_ids_speculative(model, [1, 2], 4)
