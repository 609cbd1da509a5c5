"""Fault-injection suite: the tiny recipe and token cache of tests/train, and small finished runs to break."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("train_conftest", Path(__file__).resolve().parents[1] / "train" / "conftest.py")
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)
# The same fixtures as tests/train: the repository as working directory, a session token cache, the tiny recipe.
at_repo_root, restore_determinism_flag, token_cache, tiny = (
    _train.at_repo_root, _train.restore_determinism_flag, _train.token_cache, _train.tiny
)
REPO = _train.REPO
KILL_AT = REPO / "tests" / "train" / "kill_at.py"


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`kmodel ARGS` in a fresh process (the repository off sys.path, as users run it)."""
    return subprocess.run([sys.executable, "-P", "-m", "kmodel.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_args(tiny, run_dir: Path, *extra: str) -> list[str]:
    args = ["train", str(tiny.recipe), "--out", str(run_dir), "--no-progress"]
    for assignment in tiny.overrides:
        args += ["--set", assignment]
    return args + list(extra)


def run_killed(tiny, run_dir: Path, mode: str, point: str, *extra: str) -> None:
    """Train in a subprocess that SIGKILLs itself at `mode` `point` (see tests/train/kill_at.py)."""
    done = subprocess.run([sys.executable, "-P", str(KILL_AT), mode, point, *train_args(tiny, run_dir, *extra)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr


@pytest.fixture
def short_run(tiny, tmp_path):
    """A finished 8-step run (checkpoints at 4 and 8, ledger on) in a fresh directory."""
    from kmodel.train import train

    run_dir = tmp_path / "run"
    train(tiny("train.max_steps=8", "train.eval_every=0"), run_dir, progress=False)
    return run_dir
