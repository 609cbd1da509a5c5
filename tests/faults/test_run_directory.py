"""The run directory under faults (issue 17, items 1, 4, 8, 9): no silent restart, no deleted work, no lost
metric record, one job per directory, operating-system errors as one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from kmodel.checkpoint import list_checkpoints
from kmodel.train import RunDirError, train
from kmodel.train.metrics import read_metrics
from kmodel.train.run import RunLock

from conftest import run_cli, train_args


def snapshot(run_dir) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "ledger.jsonl", "config.yaml")}


# --- item 1: --resume never restarts silently -----------------------------------------------------------------


def test_resume_without_the_checkpoints_folder_is_refused_and_erases_nothing(short_run):
    before = snapshot(short_run)
    os.rename(short_run / "checkpoints", short_run / "checkpoints.unmounted")
    with pytest.raises(RunDirError, match=r"checkpoints does not exist, yet ledger\.jsonl records checkpoints at "
                       r"steps \[4, 8\]; metrics\.jsonl records steps up to 8 .* pass --restart"):
        train(None, short_run, resume=True, progress=False)
    assert snapshot(short_run) == before


def test_restart_trains_again_from_step_0_keeping_the_history(short_run):
    old_metrics = read_metrics(short_run)
    shutil.rmtree(short_run / "checkpoints")
    train(None, short_run, resume=True, restart=True, max_steps=4, progress=False)
    assert [r["step"] for r in read_metrics(short_run) if r["kind"] == "train"] == [1, 2, 3, 4]
    kept = [json.loads(line) for line in (short_run / "metrics.discarded.jsonl").read_text().splitlines()]
    assert kept == old_metrics  # moved aside, not truncated
    ledger = [json.loads(line) for line in (short_run / "ledger.jsonl").read_text().splitlines()]
    assert [(r["kind"], r.get("step"), r.get("resumed_from_step")) for r in ledger] == [
        ("genesis", None, None), ("checkpoint", 4, None), ("checkpoint", 8, None), ("resume", None, 0),
        ("checkpoint", 4, None),
    ]
    from kmodel.ledger import chain_problems

    assert chain_problems(ledger) == []


def test_restart_is_refused_while_a_checkpoint_is_left(short_run):
    with pytest.raises(RunDirError, match=r"--restart .* has step_0000008; drop --restart"):
        train(None, short_run, resume=True, restart=True, progress=False)


# --- item 4: --force deletes only a kmodel run, and only once the run can start -------------------------------


def test_force_refuses_a_directory_that_is_not_a_run(tiny, tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirError, match=r"--force deletes only a kmodel run directory, .* no readable config\.yaml"):
        train(tiny(), tmp_path, force=True, max_steps=2, progress=False)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_force_never_deletes_the_working_directory_the_recipe_or_the_data(tiny, short_run, monkeypatch):
    recipe = short_run / "recipe.yaml"
    recipe.write_text(tiny.recipe.read_text())
    with pytest.raises(RunDirError, match=r"--force would delete the recipe"):
        train(tiny(), short_run, force=True, recipe=recipe, max_steps=2, progress=False)
    data = short_run / "mine.jsonl"
    shutil.copy("data/corpus/train/code_python_stdlib.jsonl", data)
    with pytest.raises(RunDirError, match=r"--force would delete data source 'code'"):
        train(tiny(f"data.sources=[{{name: code, path: {data}}}]"), short_run, force=True, max_steps=2, progress=False)
    assert recipe.is_file() and data.is_file() and list_checkpoints(short_run)

    monkeypatch.chdir(short_run)  # `--out .` from inside the run
    with pytest.raises(RunDirError, match=r"--force would delete the working directory"):
        train(tiny(f"data.sources=[{{name: code, path: {data}}}]"), ".", force=True, max_steps=2, progress=False)


def test_force_with_bad_data_deletes_nothing(tiny, short_run):
    before = snapshot(short_run)
    with pytest.raises(Exception, match="does not exist"):
        train(tiny("data.sources=[{path: data/corpus/train/missing.jsonl}]"), short_run, force=True, progress=False)
    assert snapshot(short_run) == before and len(list_checkpoints(short_run)) == 2


# --- item 8: one bad metrics line ----------------------------------------------------------------------------


def test_a_bad_metrics_line_keeps_every_other_record_through_a_resume(tiny, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny("train.max_steps=8", "train.eval_every=0"), run_dir, progress=False)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a torn write in the middle of the file
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == [1, 2, 4, 5, 6, 7, 8]
    train(None, run_dir, resume=True, max_steps=10, progress=False)
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert lines[2] in (run_dir / "metrics.discarded.jsonl").read_text()


# --- item 9: one job per run directory; OS errors as one line --------------------------------------------------


def test_a_second_job_on_the_same_run_directory_is_refused(short_run):
    with RunLock(short_run, create=False):
        with pytest.raises(RunDirError, match=rf"{short_run} is in use by pid {os.getpid()} on .*: two jobs must not "
                           "write one run directory"):
            train(None, short_run, resume=True, max_steps=10, progress=False)
    assert not (short_run / ".lock").read_text()  # released, and the next job may run
    train(None, short_run, resume=True, max_steps=9, progress=False)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs: a directory nobody, root included, may write")
def test_an_unwritable_out_is_a_one_line_error(tiny):
    done = run_cli(*train_args(tiny, "/sys/kmodel-run"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "cannot write /sys/kmodel-run: Operation not permitted. Choose a writable --out" in done.stderr
