"""A tiny model on the real bundled corpus, a shared token cache, and one finished reference run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kmodel.config import load_config

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny-ko-moe.yaml"
# The tiny recipe shrunk so a step takes a fraction of a second; the data and tokenizer stay real.
TINY_OVERRIDES = [
    "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128", "model.head_dim=16",
    "model.moe_intermediate_size=32", "model.num_experts=4", "model.sliding_window=16",
    "data.seq_len=64", "train.micro_batch_size=4", "train.max_steps=12", "train.warmup_steps=2", "train.lr=1e-2",
    "train.checkpoint_every=4", "train.keep_checkpoints=2", "train.eval_every=6", "train.eval_batches=2",
]


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository


@pytest.fixture(autouse=True)
def restore_determinism_flag():
    """A Trainer turns on torch's deterministic algorithms process-wide; leave other tests as they were."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """One token cache for the session (subprocesses inherit it), away from the user's ~/.cache."""
    previous = os.environ.get("KMODEL_CACHE")
    os.environ["KMODEL_CACHE"] = str(tmp_path_factory.mktemp("kmodel-cache"))
    yield Path(os.environ["KMODEL_CACHE"])
    if previous is None:
        del os.environ["KMODEL_CACHE"]
    else:
        os.environ["KMODEL_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny():
    """tiny(*overrides) -> the shrunk recipe as a Config; tiny.overrides is the --set list."""

    def make(*extra: str):
        return load_config(RECIPE, TINY_OVERRIDES + list(extra))

    make.overrides = TINY_OVERRIDES
    make.recipe = RECIPE
    return make


@pytest.fixture(scope="session")
def reference_run(tiny, tmp_path_factory):
    """A finished, uninterrupted 12-step run of the tiny recipe."""
    from kmodel.train import train

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cwd, deterministic = os.getcwd(), torch.are_deterministic_algorithms_enabled()
    os.chdir(REPO)
    try:
        train(tiny(), run_dir, progress=False)
    finally:
        os.chdir(cwd)
        torch.use_deterministic_algorithms(deterministic)
    return run_dir
