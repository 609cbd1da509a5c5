"""`kmodel train RECIPE --init-from CKPT`: a run started from external weights (an HF import, or another run's
checkpoint) trains from them, and its ledger says so: provenance verify reports "initialised from external
weights", never "from scratch"."""

from __future__ import annotations

import pytest

from kmodel.checkpoint import CheckpointError, latest_valid_checkpoint, read_weights
from kmodel.export.hf import export_hf
from kmodel.export.hf_import import import_hf
from kmodel.hashing import weights_sha256
from kmodel.ledger import read_records
from kmodel.provenance.verify import PASS, WARN, verify_run
from kmodel.train import RunDirError, train


@pytest.mark.slow
def test_a_run_initialised_from_imported_weights_is_recorded_as_such(tiny, tmp_path):
    # one dense MTP depth: K-EXAONE's layout has names for it, so the import is the whole model
    cfg = tiny("train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=4", "model.mtp_mlp_type=dense")
    first = tmp_path / "first"
    train(cfg, first, progress=False)
    export_hf(latest_valid_checkpoint(first)[0], tmp_path / "hf", dtype="float32")
    import_hf(tmp_path / "hf", tmp_path / "imported")

    second = tmp_path / "second"
    train(cfg, second, progress=False, init_from=tmp_path / "imported")
    genesis = read_records(second)[0][0]
    source = genesis["init_from"]
    assert source["imported_from"]["format"] == "hf" and "config.json" in source["imported_from"]["files"]
    assert genesis["init_weights_sha256"] == weights_sha256(read_weights(tmp_path / "imported"))
    checks = {c.name: c for c in verify_run(second, check_init=True)}
    assert checks["init_weights"].status == WARN
    assert "initialised from external weights, not from scratch" in checks["init_weights"].reason
    assert {c.name: c for c in verify_run(first, check_init=True)}["init_weights"].status == PASS  # from scratch


def test_init_from_refuses_another_model_and_a_resume(tiny, tmp_path):
    from kmodel.checkpoint import save_checkpoint
    from kmodel.model import build_model

    other = tiny("model.hidden_size=32", "model.head_dim=8")
    save_checkpoint(tmp_path / "other", build_model(other), other)
    with pytest.raises(CheckpointError, match="another model config .*model.hidden_size"):
        train(tiny("train.max_steps=2"), tmp_path / "run", progress=False, init_from=tmp_path / "other")
    with pytest.raises(RunDirError, match="--init-from starts a run"):
        train(tiny(), tmp_path / "run2", resume=True, progress=False, init_from=tmp_path / "other")
