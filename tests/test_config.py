"""The recipe: validation errors name the key; overrides and resolution behave."""

from __future__ import annotations

import pytest
import yaml

from kmodel.config import ConfigError, config_from_dict, load_config

TINY = "recipes/tiny-ko-moe.yaml"


def tiny_tree() -> dict:
    return yaml.safe_load(open(TINY, encoding="utf-8"))


def error_for(**model_changes) -> str:
    tree = tiny_tree()
    tree["model"].update(model_changes)
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree, "test-recipe")
    return str(info.value)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"num_key_value_heads": 3}, "num_attention_heads (4) must be divisible by num_key_value_heads (3)"),
        ({"sliding_window": 0}, "sliding_window must be positive"),
        ({"sliding_window": -5}, "sliding_window must be positive"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok (9) exceeds num_experts (8)"),
        ({"n_group": 3}, "n_group (3) does not divide num_experts (8)"),
        ({"n_group": 2, "topk_group": 3}, "topk_group (3) exceeds n_group (2)"),
        ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "exceeds the experts in topk_group"),
        ({"sliding_window_pattern": "LLX"}, "sliding_window_pattern 'LLX'"),
        ({"layer_types": ["full_attention"] * 3, "sliding_window_pattern": None}, "layer_types has 3 entries"),
        ({"moe_intermediate_size": None}, "moe_intermediate_size is required"),
        ({"num_experts": 0, "mlp_layer_types": ["dense", "sparse", "dense", "dense"]}, "num_experts is 0"),
        ({"head_dim": 31}, "head_dim (31) must be even"),
    ],
)
def test_invalid_model_values_name_the_key(changes, expected):
    message = error_for(**changes)
    assert "test-recipe" in message
    assert expected in message


def test_unknown_key_suggests_closest():
    message = error_for(num_expert=16)
    assert "unknown key 'model.num_expert'" in message and "did you mean 'num_experts'?" in message
    tree = tiny_tree()
    tree["train"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match="unknown key 'train.learning_rate'"):
        config_from_dict(tree)
    tree = tiny_tree()
    tree["data"]["sources"][0]["wieght"] = 2
    with pytest.raises(ConfigError, match="did you mean 'weight'"):
        config_from_dict(tree)


def test_type_errors_and_missing_sections():
    assert "model.hidden_size" in error_for(hidden_size="big")
    with pytest.raises(ConfigError, match="model"):
        config_from_dict({"seed": 1})


def test_overrides_and_resolution(tmp_path):
    cfg = load_config(TINY, ["model.num_experts=16", "seed=7", "train.lr=1e-4", "kernels.attention=torch"])
    assert cfg.model.num_experts == 16 and cfg.seed == 7 and cfg.train.lr == 1e-4
    assert cfg.model.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert cfg.model.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"]
    # The resolved config reloads to the same thing.
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).fingerprint() == cfg.fingerprint()


def test_pattern_forms_and_last_layer_global():
    as_int = error_free(sliding_window_pattern=3, num_hidden_layers=5)
    assert as_int == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    as_str = error_free(sliding_window_pattern="LLLG", num_hidden_layers=6)
    assert as_str[-1] == "full_attention" and as_str[3] == "full_attention" and as_str[4] == "sliding_attention"


def error_free(**model_changes) -> list[str]:
    tree = tiny_tree()
    tree["model"].update(model_changes)
    return config_from_dict(tree).model.layer_types


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(TINY, ["model.num_experts"])
