"""Validation gaps that used to waste runs (issue 17, item 10): each is refused up front, naming the culprit,
and leaves no run directory behind."""

from __future__ import annotations

import json
import shutil

import pytest

from kmodel.config import ConfigError, load_config
from kmodel.data import DataError
from kmodel.train import Trainer, train

from conftest import run_cli, train_args


@pytest.mark.parametrize("assignment, culprit", [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("model.rms_norm_eps=-.inf", "model.rms_norm_eps"),
])
def test_non_finite_numbers_are_refused(tiny, assignment, culprit):
    with pytest.raises(ConfigError, match=rf"{culprit}: Input should be a finite number"):
        tiny(assignment)


def test_sequence_window_and_warmup_must_fit(tiny):
    with pytest.raises(ConfigError, match=r"data\.seq_len \(2048\) exceeds model\.max_position_embeddings \(1024\)"):
        tiny("data.seq_len=2048")
    with pytest.raises(ConfigError, match=r"sliding_window \(4096\) exceeds max_position_embeddings \(1024\)"):
        tiny("model.sliding_window=4096")
    with pytest.raises(ConfigError, match=r"train: warmup_steps \(50\) exceeds max_steps \(12\)"):
        tiny("train.warmup_steps=50")


def test_a_refused_recipe_creates_no_run_directory(tiny, tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli(*train_args(tiny, run_dir, "--set", "train.lr=.inf"))
    assert done.returncode == 2 and "train.lr: Input should be a finite number" in done.stderr
    assert not run_dir.exists()


def test_recipe_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"recipe {tmp_path} is a directory; give the YAML file"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"recipe {latin1} is not UTF-8 text \(byte 9"):
        load_config(latin1)


def test_a_set_value_that_is_not_yaml_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match=r"--set 'data\.heldout=\[1,2': the value '\[1,2' is not valid YAML"):
        load_config(tiny.recipe, ["data.heldout=[1,2"])


def test_a_failed_fresh_run_does_not_block_the_corrected_rerun(tiny, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="does not exist"):
        train(tiny("data.sources=[{path: data/corpus/train/missing.jsonl}]"), run_dir, max_steps=2, progress=False)
    assert not run_dir.exists()  # the data is loaded before anything is written

    def out_of_memory(self):
        raise RuntimeError("CUDA out of memory (simulated)")

    with monkeypatch.context() as patch:  # fails in its first step: config.yaml and the genesis record written
        patch.setattr(Trainer, "train_step", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            train(tiny(), run_dir, max_steps=2, progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml", "ledger.jsonl"]
    train(tiny(), run_dir, max_steps=2, progress=False)  # the corrected rerun, without --force
    assert json.loads((run_dir / "ledger.jsonl").read_text().splitlines()[0])["kind"] == "genesis"


def test_a_mistyped_relative_data_folder_fails_at_once_without_the_hub(tiny, tmp_path):
    with pytest.raises(DataError, match=r"data/trian does not exist"):
        train(tiny("data.sources=[{path: data/trian}]"), tmp_path / "run", max_steps=2, progress=False)


def test_resume_cannot_shorten_a_run_or_rewrite_its_config(short_run):
    config = (short_run / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"train\.max_steps \(6\) is below step 8, which .* has reached \(step_0000008\)"):
        train(None, short_run, resume=True, max_steps=6, progress=False)
    assert (short_run / "config.yaml").read_bytes() == config


@pytest.mark.slow  # three `kmodel eval` processes
def test_eval_options_are_checked(short_run):
    data = "data/corpus/heldout/ko_libreoffice_help.jsonl"
    for option, value, message in [
        ("--max-batches", "0", "--max-batches must be at least 1, got 0"),
        ("--seq-len", "0", "--seq-len must be between 2 and the model's context (max_position_embeddings 1024), got 0"),
        ("--seq-len", "4096", "got 4096"),
    ]:
        done = run_cli("eval", str(short_run), "--data", data, option, value)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow  # three `kmodel eval` processes
def test_eval_refuses_a_tokenizer_other_than_the_models(short_run):
    data = "data/corpus/heldout/ko_libreoffice_help.jsonl"
    model_file = short_run / "checkpoints" / "step_0000008" / "tokenizer" / "tokenizer.model"
    other = bytearray(model_file.read_bytes())
    other[len(other) // 2] ^= 0x01  # same vocabulary size, different pieces
    model_file.write_bytes(bytes(other))
    done = run_cli("eval", str(short_run / "checkpoints" / "step_0000008"), "--data", data, "--max-batches", "1")
    assert done.returncode == 1 and "tokenizer/tokenizer.model does not match its recorded sha256" in done.stderr, done.stderr
    shutil.rmtree(model_file.parent)  # gone: the recipe's tokenizer must not stand in silently
    done = run_cli("eval", str(short_run / "checkpoints" / "step_0000008"), "--data", data, "--max-batches", "1")
    assert done.returncode == 1 and "tokenizer/" in done.stderr and "is missing" in done.stderr, done.stderr
