"""MuonClip: per-head max attention logits are the true maxima, and the query/key rescale brings every head
above tau exactly to tau (MHA, GQA with biases, MLA with and without a low-rank query), a no-op under QK-norm."""

from __future__ import annotations

import math

import pytest
import torch

from kmodel.config import ConfigError, ModelConfig, load_config
from kmodel.model.attention import Attention, max_logits
from kmodel.model.mla import LatentAttention
from kmodel.model.rope import rope_cos_sin
from kmodel.train import Trainer
from kmodel.train.metrics import read_metrics
from kmodel.train.muon import QKClip

SEQ = 12
BASE = {"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "qk_norm": False}
MLA = {"attention_kind": "mla", "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}
KINDS = {
    "mha": {"num_attention_heads": 4, "num_key_value_heads": 4},
    "gqa_bias_window": {"num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True, "sliding_window": 5,
                        "layer_types": ["sliding_attention"]},
    "mla_low_rank_q": {"num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 16, **MLA},
    "mla_full_q": {"num_attention_heads": 4, "num_key_value_heads": 4, **MLA},
}


def make_attention(kind: str, **extra):
    cfg = ModelConfig(**{**BASE, **KINDS[kind], **extra})
    attn = (LatentAttention if cfg.attention_kind == "mla" else Attention)(cfg, 0)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in attn.parameters():
            param.copy_(torch.randn_like(param) * (1.0 if param.ndim == 1 and param.shape[0] > 16 else 0.5))
    positions = torch.arange(SEQ)
    return cfg, attn, rope_cos_sin(positions, cfg.rope_dim, cfg.rope_theta), positions


def brute_force_max_logits(q, k, scale, window, docs):
    """Per head, the largest scale * q.k over visible pairs, by looping over every pair."""
    batch, seq, heads, _ = q.shape
    group = heads // k.shape[2]
    best = torch.full((heads,), -math.inf)
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                for j in range(i + 1):
                    if (window is None or i - j < window) and docs[b][i] == docs[b][j]:
                        best[h] = max(best[h], float(scale * q[b, i, h] @ k[b, j, h // group]))
    return best


def test_max_logits_are_the_maxima_over_visible_pairs():
    torch.manual_seed(1)
    q, k = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8)
    cu = torch.tensor([0, 4, 9, 13, 18])  # documents over the flattened batch: [4, 5] then [4, 5]
    docs = [[0] * 4 + [1] * 5, [2] * 4 + [3] * 5]
    for window in (None, 3):
        got = max_logits(q, k, scale=0.3, window=window, cu_seqlens=cu, block=4)
        torch.testing.assert_close(got, brute_force_max_logits(q, k, 0.3, window, docs))


@pytest.mark.parametrize("kind", list(KINDS))
def test_clipping_brings_every_head_above_tau_to_tau_and_leaves_the_others(kind):
    cfg, attn, rope, positions = make_attention(kind)
    x = torch.randn(2, SEQ, cfg.hidden_size)
    clip = QKClip(attn, tau=1.0)
    attn.train()
    attn(x, rope, positions)
    before = clip.step_logits()[""]
    clip.tau = float(before.sort().values[1])  # two or three heads above, at least one at or under
    assert (before > clip.tau).sum() >= 2 and (before <= clip.tau).any()
    QKClip.apply(attn, clip.row_scales({"": before}))
    attn(x, rope, positions)
    after = clip.step_logits()[""]
    torch.testing.assert_close(after, before.clamp(max=clip.tau), rtol=1e-5, atol=1e-5)


def test_qk_norm_makes_the_rescale_a_no_op_but_logits_are_still_tracked():
    cfg, attn, rope, positions = make_attention("mha", qk_norm=True)
    clip = QKClip(attn, tau=1e-3)
    attn.train()
    attn(torch.randn(1, SEQ, cfg.hidden_size), rope, positions)
    logits = clip.step_logits()
    assert (logits[""] > 1e-3).all()
    assert clip.row_scales(logits) == {}  # the logits do not depend on the q/k projection scale under QK-norm


def test_tracking_is_off_unless_muonclip_is_on_and_ignores_eval():
    cfg, attn, rope, positions = make_attention("mha")
    attn(torch.randn(1, SEQ, cfg.hidden_size), rope, positions)
    assert attn.max_logits is None
    clip = QKClip(attn, tau=1.0)
    attn.eval()
    attn(torch.randn(1, SEQ, cfg.hidden_size), rope, positions)
    assert torch.isneginf(clip.step_logits()[""]).all()


@pytest.mark.slow
def test_the_trainer_logs_per_head_logits_clips_and_plots(tiny, tmp_path):
    cfg = tiny("train.optimizer=muon", "train.qk_clip_tau=0.1", "model.qk_norm=false", "train.max_steps=3",
               "train.eval_every=0", "provenance.ledger=false")
    trainer = Trainer(cfg, tmp_path, progress=False)
    applied = []
    trainer.scale_rows = lambda scales: (applied.append(scales), Trainer.scale_rows(trainer, scales))
    trainer.fit()
    records = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    for record, scales in zip(records, applied, strict=True):  # one clip per applied step
        layers = record["attention_logits"]
        assert len(layers) == cfg.model.num_hidden_layers + cfg.model.num_nextn_predict_layers  # MTP too
        assert all(len(heads) == cfg.model.num_attention_heads for heads in layers.values())
        over = {name for name, heads in layers.items() if max(heads) > 0.1}
        assert {n.rsplit(".", 2)[0] for n in scales} == over  # exactly the layers with a head above tau
        assert over and all(float(f.min()) < 1 for n, f in scales.items() if n.endswith("k_proj.weight"))
    from kmodel.train.plots import write_plots

    assert any(p.name == "attention_logits.png" for p in write_plots(tmp_path))


def test_muonclip_refuses_differential_attention_by_name():
    with pytest.raises(ConfigError, match="train.qk_clip_tau"):
        load_config("recipes/tiny/motif-2.yaml", ["train.qk_clip_tau=100"])
