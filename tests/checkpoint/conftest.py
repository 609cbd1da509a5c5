"""Checkpoint tests that train: the tiny recipe and token cache of tests/train."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("train_conftest", Path(__file__).resolve().parents[1] / "train" / "conftest.py")
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)
at_repo_root, restore_determinism_flag, token_cache, tiny = (
    _train.at_repo_root, _train.restore_determinism_flag, _train.token_cache, _train.tiny
)
