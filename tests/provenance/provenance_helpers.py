"""Shared settings of the provenance tests: the small model and the tiny training run's recipe overrides."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny-ko-moe.yaml"
SMALL_MODEL = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.moe_intermediate_size=16",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.head_dim=16",
    "model.num_hidden_layers=2",
    "model.num_experts=4",
    "model.sliding_window=16",
]
RUN_STEPS = 6
CHECKPOINT_EVERY = 2


def small_copy(source: Path, target: Path, lines: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, encoding="utf-8") as f:
        target.write_text("".join(next(f) for _ in range(lines)), encoding="utf-8")


def run_overrides() -> list[str]:
    return SMALL_MODEL + [
        "data.sources=[{name: ko, path: data/ko.jsonl, weight: 0.7}, {name: code, path: data/code.jsonl, weight: 0.3}]",
        "data.heldout=[data/heldout.jsonl]",
        "data.seq_len=32",
        "train.micro_batch_size=2",
        f"train.max_steps={RUN_STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.keep_checkpoints=10",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.device=cpu",
    ]
