"""Learning-rate schedules, weight-decay groups and the FLOP count behind MFU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kmodel.config import TrainConfig, load_config
from kmodel.model import build_model
from kmodel.train.flops import active_matmul_params, attention_flops_per_token, mean_keys_seen, training_flops_per_token
from kmodel.train.optim import build_optimizer
from kmodel.train.schedule import lr_at

RECIPE = Path(__file__).resolve().parents[2] / "recipes/tiny-ko-moe.yaml"
SMALL = ["model.vocab_size=101", "model.hidden_size=32", "model.head_dim=8", "model.intermediate_size=48",
         "model.moe_intermediate_size=16", "model.sliding_window=4"]


def schedule(kind: str, **extra) -> list[float]:
    train = TrainConfig(schedule=kind, lr=1.0, min_lr_ratio=0.1, warmup_steps=4, max_steps=20, **extra)
    return [lr_at(s, train, 20) for s in range(20)]


def test_warmup_is_linear_to_the_peak():
    for kind in ("cosine", "wsd", "constant"):
        assert schedule(kind)[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_falls_monotonically_from_peak_toward_the_floor():
    lrs = schedule("cosine")[4:]
    assert lrs[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lrs[len(lrs) // 2] == pytest.approx(0.55)  # halfway: mean of peak and floor


def test_wsd_is_stable_then_decays_linearly_to_the_floor():
    lrs = schedule("wsd", decay_fraction=0.25)  # last 5 of 20 steps decay
    assert lrs[4:15] == [1.0] * 11
    assert lrs[15:] == pytest.approx([1.0 - 0.9 * k / 5 for k in range(1, 6)])
    assert lrs[-1] == pytest.approx(0.1)


def test_constant_stays_at_the_peak():
    assert schedule("constant")[4:] == [1.0] * 16


def _decay_of(optimizer) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_no_decay_on_norms_biases_and_embeddings_unless_asked(decay_embeddings):
    cfg = load_config(RECIPE, SMALL + [f"train.decay_embeddings={decay_embeddings}", "train.weight_decay=0.1"])
    model = build_model(cfg)
    decay = _decay_of(build_optimizer(model, cfg.train))
    params = dict(model.named_parameters())
    assert len(decay) == len(params)
    for name, p in params.items():
        if "norm" in name:
            assert decay[id(p)] == 0.0, name
        elif name in ("embed_tokens.weight", "lm_head.weight"):
            assert decay[id(p)] == (0.1 if decay_embeddings else 0.0), name
        else:
            assert p.ndim >= 2 and decay[id(p)] == 0.1, name


def test_mean_keys_seen_matches_counting_the_mask():
    for seq, window in [(16, None), (16, 4), (16, 16), (16, 40), (7, 3)]:
        q = torch.arange(seq)[:, None]
        k = torch.arange(seq)[None, :]
        visible = (k <= q) & ((q - k < window) if window else True)
        assert mean_keys_seen(seq, window) == pytest.approx(visible.sum().item() / seq)


def test_active_params_count_top_k_of_the_experts():
    cfg = load_config(RECIPE, SMALL + ["model.num_experts_per_tok=8", "model.n_group=1"])  # k = E: all active
    model = build_model(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters() if n != "embed_tokens.weight")
    mtp_head = cfg.model.hidden_size * cfg.model.vocab_size
    assert active_matmul_params(model) == matmul + mtp_head
    sparse = build_model(load_config(RECIPE, SMALL))  # k = 2 of 8
    experts = sum(p.numel() for n, p in sparse.named_parameters() if ".experts." in n)
    assert active_matmul_params(sparse) == pytest.approx(matmul + mtp_head - experts * (1 - 2 / 8))
    # An expert-parallel rank holding 2 of the 8 experts reports the same model FLOPs (MFU is per model).
    shard = build_model(load_config(RECIPE, SMALL), experts=(2, 2))
    assert active_matmul_params(shard) == pytest.approx(active_matmul_params(sparse))


def test_attention_flops_respect_the_sliding_window():
    cfg = load_config(RECIPE, SMALL)
    m = cfg.model
    per_layer = lambda window: 2 * m.num_attention_heads * 2 * m.head_dim * mean_keys_seen(256, window)  # noqa: E731
    kinds = list(m.layer_types) + [m.layer_types[-1]]  # + the MTP block
    expected = sum(per_layer(m.sliding_window if k == "sliding_attention" else None) for k in kinds)
    assert attention_flops_per_token(m, 256) == pytest.approx(expected)
    full = load_config(RECIPE, SMALL + ["model.sliding_window_pattern=null", "model.layer_types=null"])
    assert attention_flops_per_token(full.model, 256) > attention_flops_per_token(m, 256)
    model = build_model(cfg)
    assert training_flops_per_token(model, 256) == pytest.approx(3 * (2 * active_matmul_params(model) + expected))


def test_attention_flops_follow_each_layers_own_window():
    """K-EXAONE 2.0 sets a window per layer ([16, 64, 8, full]; 4 MTP depths copy the last, full layer): each layer's
    keys count under its own window, not under the largest one that sliding_window resolves to."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "k-exaone-2.yaml").model
    per_key = 2 * cfg.num_attention_heads * 2 * cfg.head_dim
    keys = sum(mean_keys_seen(128, w) for w in [16, 64, 8, None, None, None, None, None])
    assert attention_flops_per_token(cfg, 128) == per_key * keys
