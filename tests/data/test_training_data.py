"""Training on prepared data end to end: exact resume, moved data (issue 17.6), stage changes in the ledger."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kmodel.config import load_config
from kmodel.data import DataError, prepare
from kmodel.ledger import read_records
from kmodel.rundir import CONFIG_FILE, LEDGER_FILE
from kmodel.train import Trainer, train
from kmodel.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny-ko-moe.yaml"
SMALL = [
    "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128", "model.head_dim=16",
    "model.moe_intermediate_size=32", "model.num_experts=4", "model.sliding_window=16", "data.seq_len=32",
    "train.micro_batch_size=2", "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_every=0",
    "train.eval_batches=1", "data.heldout=[]",
]


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KMODEL_CACHE", str(tmp_path / "cache"))


def corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("ko_libreoffice_help.jsonl", "code_python_stdlib.jsonl"):
        lines = (REPO / "data/corpus/train" / name).read_text(encoding="utf-8").rstrip("\n").split("\n")[:40]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def sources(folder: Path, ko_weight: float = 3) -> str:
    return (f"data.sources=[{{name: ko, path: {folder / 'ko_libreoffice_help.jsonl'}, weight: {ko_weight}}}, "
            f"{{name: code, path: {folder / 'code_python_stdlib.jsonl'}}}]")


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.mark.slow
def test_moved_data_resumes_with_the_same_losses_and_changed_data_is_refused(tmp_path, capsys):
    first_home = corpus(tmp_path / "a")
    reference, run = tmp_path / "reference", tmp_path / "run"
    train(load_config(RECIPE, SMALL + [sources(first_home)]), reference, max_steps=4, progress=False)
    train(load_config(RECIPE, SMALL + [sources(first_home)]), run, max_steps=2, progress=False)

    second_home = tmp_path / "b"
    shutil.move(first_home, second_home)  # the same bytes, elsewhere
    train(load_config(RECIPE, SMALL + [sources(second_home)]), run, max_steps=4, resume=True, progress=False)
    assert losses(run) == losses(reference)
    assert f"{first_home / 'code_python_stdlib.jsonl'} -> {second_home / 'code_python_stdlib.jsonl'}" in capsys.readouterr().err

    third_home = tmp_path / "c"  # an edited config.yaml pointing at the new place resumes too
    shutil.move(second_home, third_home)
    config = yaml.safe_load((run / CONFIG_FILE).read_text())
    for source in config["data"]["sources"]:
        source["path"] = source["path"].replace(str(second_home), str(third_home))
    (run / CONFIG_FILE).write_text(yaml.safe_dump(config))
    train(None, run, max_steps=6, resume=True, progress=False)

    changed = third_home / "code_python_stdlib.jsonl"
    changed.write_bytes(changed.read_bytes().replace(b"def ", b"def  ", 1))
    with pytest.raises(DataError, match=r"the training data changed since: source 'code': .*code_python_stdlib\.jsonl \(changed\)"):
        train(None, run, max_steps=8, resume=True, progress=False)


@pytest.mark.slow
def test_prepared_data_trains_and_resumes_exactly_like_the_sources(tmp_path):
    home = corpus(tmp_path / "corpus")
    prepared = tmp_path / "prepared"
    prepare(load_config(RECIPE, SMALL + [sources(home)]).data, prepared, part_bytes=9_000, progress=False)
    on_sources, on_prepared = tmp_path / "sources", tmp_path / "on-prepared"
    train(load_config(RECIPE, SMALL + [sources(home)]), on_sources, max_steps=4, progress=False)
    cfg = load_config(RECIPE, SMALL + [f"data.prepared={prepared}", "data.sources=[]"])
    train(cfg, on_prepared, max_steps=2, progress=False)
    train(None, on_prepared, max_steps=4, resume=True, progress=False)
    assert losses(on_prepared) == losses(on_sources)
    genesis = read_records(on_prepared / LEDGER_FILE)[0][0]
    assert genesis["data_manifest"]["prepared"]["path"] == str(prepared)
    assert genesis["data_manifest"]["merkle_root"] == read_records(on_sources / LEDGER_FILE)[0][0]["data_manifest"]["merkle_root"]


def test_a_stage_change_takes_new_weights_and_seq_len_and_is_recorded(tmp_path):
    home = corpus(tmp_path / "corpus")
    stage0 = tmp_path / "stage0"
    train(load_config(RECIPE, SMALL + [sources(home)]), stage0, max_steps=2, progress=False)

    def stage1(run_dir: Path) -> Trainer:
        trainer = Trainer(load_config(RECIPE, SMALL + [sources(home, ko_weight=0.5), "data.seq_len=48"]), run_dir,
                          progress=False)
        trainer.start_stage(stage0 / "checkpoints")
        trainer.start_ledger(resume=False)
        return trainer

    a, b = stage1(tmp_path / "a"), stage1(tmp_path / "b")
    assert a.data.stage == 1 and a.data.seq_len == 48
    assert a.next_micro_batch().input_ids.tolist() == b.next_micro_batch().input_ids.tolist()  # deterministic
    order = read_records(tmp_path / "a" / LEDGER_FILE)[0][0]["data_manifest"]["order"]
    assert order["stage"] == 1 and order["seq_len"] == 48 and order["weights"] == {"ko": 0.5, "code": 1.0}
    (previous,) = order["previous_stages"]
    assert previous["stage"] == 0 and previous["rows"] == 4 and previous["seq_len"] == 32
    assert previous["weights"] == {"ko": 3.0, "code": 1.0} and sum(previous["tokens"].values()) == 4 * 32
    assert json.loads(json.dumps(order)) == order

    continued = tmp_path / "continued"  # the same through `kmodel train --init-from`
    train(load_config(RECIPE, SMALL + [sources(home, ko_weight=0.5), "data.seq_len=48"]), continued, max_steps=2,
          progress=False, init_from=stage0)
    assert read_records(continued / LEDGER_FILE)[0][0]["data_manifest"]["order"] == order


def test_a_resume_may_name_new_data_locations_but_no_other_data_change(tmp_path):
    from kmodel.config import ConfigError
    from kmodel.train.run import check_resumable

    saved = load_config(RECIPE, SMALL + [sources(tmp_path / "a")])
    check_resumable(saved, load_config(RECIPE, SMALL + [sources(tmp_path / "b")]), tmp_path)
    check_resumable(saved, load_config(RECIPE, SMALL + [f"data.prepared={tmp_path}"] + [sources(tmp_path / "b")]), tmp_path)
    with pytest.raises(ConfigError, match=r"data\.sources"):
        check_resumable(saved, load_config(RECIPE, SMALL + [sources(tmp_path / "a", ko_weight=1)]), tmp_path)
