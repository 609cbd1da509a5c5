"""A real (tiny) training run with its ledger, shared by the verify, replay, report and CLI tests.

The run trains from small copies of the bundled corpus under relative paths in a data root of its own, so
tests can change a data file in a copy of that root without touching the repository."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
from provenance_helpers import RECIPE, REPO, run_overrides, small_copy


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, data root) of a 6-step run with checkpoints at steps 2, 4 and 6."""
    from kmodel.config import load_config
    from kmodel.train import train

    base = tmp_path_factory.mktemp("provenance_run")
    data_root = base / "root"
    corpus = REPO / "data" / "corpus"
    small_copy(corpus / "train" / "ko_libreoffice_help.jsonl", data_root / "data" / "ko.jsonl", 40)
    small_copy(corpus / "train" / "code_python_stdlib.jsonl", data_root / "data" / "code.jsonl", 10)
    small_copy(corpus / "heldout" / "ko_libreoffice_help.jsonl", data_root / "data" / "heldout.jsonl", 5)
    previous_cache = os.environ.get("KMODEL_CACHE")
    os.environ["KMODEL_CACHE"] = str(base / "cache")
    try:
        with contextlib.chdir(data_root):
            cfg = load_config(RECIPE, run_overrides())
            train(cfg, base / "run", progress=False)
    finally:
        if previous_cache is None:
            os.environ.pop("KMODEL_CACHE", None)
        else:
            os.environ["KMODEL_CACHE"] = previous_cache
    return base / "run", data_root


@pytest.fixture
def run_copy(trained_run, tmp_path) -> tuple[Path, Path]:
    """A private copy of the trained run and its data root, free to tamper with."""
    run_dir, data_root = trained_run
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.copytree(data_root, tmp_path / "root")
    return tmp_path / "run", tmp_path / "root"
