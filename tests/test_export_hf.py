"""Parity with transformers: export random small kmodel configs and compare logits and gradients.

transformers is an independent reference here (test-only dependency); kmodel itself never imports it.
"""

from __future__ import annotations

import random

import pytest
import torch

from kmodel.checkpoint import save_checkpoint
from kmodel.config import config_from_dict
from kmodel.export.hf import FAMILIES, ExportError, export_hf
from kmodel.model import build_model

transformers = pytest.importorskip("transformers")


def tiny_model(rng: random.Random, **overrides) -> dict:
    heads = rng.choice([2, 4])
    model = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": rng.choice([2, 3, 4]),
        "num_attention_heads": heads,
        "num_key_value_heads": rng.choice([h for h in (1, 2, 4) if heads % h == 0]),
        "head_dim": rng.choice([8, 16]),
        "rope_theta": rng.choice([10000.0, 500000.0]),
        "max_position_embeddings": 128,
        "initializer_range": 0.2,  # large weights so mistakes show in the logits
    }
    model.update(overrides)
    return model


def moe_fields(rng: random.Random) -> dict:
    experts = rng.choice([4, 6, 8])
    n_group = rng.choice([g for g in (1, 2) if experts % g == 0])
    topk_group = rng.choice(range(1, n_group + 1))
    top_k = rng.choice(range(1, topk_group * (experts // n_group) + 1))
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "num_shared_experts": rng.choice([1, 2]),
        "moe_intermediate_size": 24,
        "n_group": n_group,
        "topk_group": topk_group,
        "routed_scaling_factor": rng.choice([1.0, 2.5]),
        "norm_topk_prob": rng.choice([True, False]),
    }


def k_exaone(rng: random.Random) -> dict:
    layers = rng.choice([2, 3, 4, 5])
    return tiny_model(
        rng,
        num_hidden_layers=layers,
        sliding_window=rng.choice([1, 3, 7, 64]),
        sliding_window_pattern=rng.choice(["LLLG", "LG", 2, "LLG"]),
        rope_layers="sliding",
        qk_norm=True,
        norm_placement="pre",
        first_k_dense_replace=rng.choice(range(0, layers)),
        num_nextn_predict_layers=rng.choice([0, 1]),
        **moe_fields(rng),
    )


def solar_open(rng: random.Random) -> dict:
    return tiny_model(rng, qk_norm=False, norm_placement="pre", rope_layers="all", **moe_fields(rng))


def exaone4(rng: random.Random) -> dict:
    return tiny_model(
        rng,
        sliding_window=rng.choice([2, 5, 64]),
        sliding_window_pattern=rng.choice(["LLLG", "LG"]),
        rope_layers="sliding",
        qk_norm=True,
        norm_placement="post",
    )


def export_and_load(model_section: dict, tmp_path, seed: int):
    cfg = config_from_dict({"seed": seed, "model": model_section, "kernels": {"attention": "torch"}})
    model = build_model(cfg)
    # Non-zero router biases so a wrong bias convention would change the selection.
    for moe in model.moe_layers().values():
        moe.gate.e_score_correction_bias.normal_(0.0, 0.05)
    save_checkpoint(tmp_path / "ckpt", model, cfg)
    family = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    )
    return cfg, model, reference, family


@pytest.mark.parametrize(
    "make, family",
    [(k_exaone, "exaone_moe"), (solar_open, "solar_open"), (exaone4, "exaone4")],
    ids=["k-exaone", "solar-open", "exaone4"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_and_gradients_match_transformers(make, family, seed, tmp_path):
    rng = random.Random(f"{family}-{seed}")
    cfg, model, reference, chosen = export_and_load(make(rng), tmp_path, seed)
    assert chosen == family
    assert type(reference).__name__ == {"exaone_moe": "ExaoneMoeForCausalLM", "solar_open": "SolarOpenForCausalLM",
                                        "exaone4": "Exaone4ForCausalLM"}[family]
    # Every exported tensor arrived unchanged (expert tensors and router biases included).
    theirs = reference.state_dict()
    family_spec = FAMILIES[family]
    for name, tensor in model.state_dict().items():
        hf_name = family_spec.rename(name, cfg.model)
        if hf_name is not None:
            assert torch.equal(theirs[hf_name], tensor), name

    ids = torch.randint(0, cfg.model.vocab_size, (2, 23), generator=torch.Generator().manual_seed(seed))
    model.eval()
    ours = model(ids).logits
    ref = reference(ids).logits
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"max relative logit error {rel:.2e}"

    # Gradient of the same loss on a few parameters.
    labels = torch.roll(ids, -1, dims=1)
    torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten()).backward()
    torch.nn.functional.cross_entropy(reference(ids).logits.flatten(0, 1), labels.flatten()).backward()
    for ours_name, hf_name in [
        ("embed_tokens.weight", "model.embed_tokens.weight"),
        ("layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"),
    ]:
        g_ours = model.get_parameter(ours_name).grad
        g_ref = reference.get_parameter(hf_name).grad
        assert (g_ours - g_ref).abs().max() <= 1e-4 * g_ref.abs().max() + 1e-7, ours_name


def test_unexpressible_config_is_refused_naming_the_feature(tmp_path):
    rng = random.Random(0)
    section = k_exaone(rng)
    section["norm_placement"] = "sandwich"
    cfg = config_from_dict({"seed": 0, "model": section})
    save_checkpoint(tmp_path / "ckpt", build_model(cfg), cfg)
    with pytest.raises(ExportError) as info:
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    message = str(info.value)
    assert "exaone_moe: norm_placement 'sandwich'" in message
    assert "exaone4: routed experts" in message
    assert not (tmp_path / "hf").exists()  # nothing half-written
    with pytest.raises(ExportError, match="solar_open cannot express this config: .*qk_norm on"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf2", family="solar_open")
