"""`kmodel provenance verify DIR`: check a run's ledger against everything that can be recomputed.

Each check ends as pass, fail, warn (recorded but worth a look, e.g. uncommitted code) or skip (nothing
to check against, e.g. a checkpoint pruned by train.keep_checkpoints), always with its reason.

    chain            every record's hash and its link to the previous record
    signature        ledger.sig.json, when present (required with --public-key)
    config           the embedded config matches its hash; config.yaml matches the last recorded config
    code             the recorded commit exists in this checkout; uncommitted changes are flagged
    init_weights     the seed and config alone reproduce the recorded initial weights (warn, naming the source,
                     for a run initialised from external weights with --init-from)
    tokenizer        each checkpoint's tokenizer (and the configured one) has the recorded fingerprint
    data             the data files hash to the recorded manifest, whose Merkle root is recomputed
    checkpoint N     files match their manifest, and model / state / optimizer / RNG hashes match the record
    unrecorded       no checkpoint on disk is missing from the ledger
    metrics          metrics.jsonl agrees with the losses the ledger recorded
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from kmodel.checkpoint import (
    TOKENIZER_DIR,
    CheckpointError,
    list_checkpoints,
    load_config_from_checkpoint,
    verify_manifest,
)
from kmodel.config import ConfigError, config_from_dict
from kmodel.hashing import merkle_root, sorted_weights_sha256
from kmodel.provenance.ledger import (
    SIGNATURE_FILE,
    LedgerError,
    chain_problems,
    check_signature,
    checkpoint_hashes,
    code_state,
    git_output,
    read_records,
    source_root,
    superseded,
)
from kmodel.rundir import CONFIG_FILE, METRICS_FILE, step_of

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"
# Hashes a checkpoint record pins, compared one by one so a report says which part differs.
CHECKPOINT_HASH_FIELDS = ("model_sha256", "weights_sha256", "state_sha256", "manifest_sha256", "optimizer_sha256", "rng_sha256")


@dataclass
class Check:
    name: str
    status: str
    reason: str


def recorded_config(records: list[dict[str, Any]], before_index: int | None = None) -> dict[str, Any]:
    """The config in force at a point of the ledger: genesis's, or that of the last resume before it."""
    config = records[0].get("config")
    for record in records[: before_index if before_index is not None else len(records)]:
        if record.get("kind") == "resume" and record.get("config") is not None:
            config = record["config"]
    return config


def verify_run(
    run_dir: str | Path,
    *,
    check_init: bool = True,
    check_data: bool = True,
    data_root: str | Path | None = None,
    public_key: str | None = None,
) -> list[Check]:
    """Every check of the module docstring, in order."""
    run_dir = Path(run_dir)
    try:
        records, torn = read_records(run_dir)
    except LedgerError as error:
        return [Check("chain", FAIL, str(error))]
    checks = _chain_checks(records, torn)
    if not records or records[0].get("kind") != "genesis":
        return checks
    genesis = records[0]
    checks.append(_signature_check(run_dir, records, public_key))
    checks += _config_checks(run_dir, records)
    checks.append(_code_check(genesis))
    cfg = _genesis_config(genesis)
    if check_init:
        checks.append(_init_check(genesis, cfg))
    else:
        checks.append(Check("init_weights", SKIP, "skipped on request (--skip-init)"))
    checks += _tokenizer_checks(run_dir, records, cfg)
    if check_data:
        checks += _data_checks(genesis, cfg, data_root)
    else:
        checks.append(Check("data", SKIP, "skipped on request (--skip-data)"))
    checks += _checkpoint_checks(run_dir, records, cfg)
    checks.append(_metrics_check(run_dir, records))
    return checks


def _chain_checks(records: list[dict[str, Any]], torn: int) -> list[Check]:
    problems = chain_problems(records)
    checks = [Check("chain", FAIL, problem) for problem in problems]
    if not problems:
        checks.append(Check("chain", PASS, f"{len(records)} records, every hash and link intact"))
    if torn:
        checks.append(Check("chain", WARN, f"the last {torn} bytes are a torn line (a crash mid-write), not a record"))
    return checks


def _signature_check(run_dir: Path, records: list[dict[str, Any]], public_key: str | None) -> Check:
    if not (run_dir / SIGNATURE_FILE).is_file():
        if public_key is not None:
            return Check("signature", FAIL, f"--public-key given but the run has no {SIGNATURE_FILE}")
        return Check("signature", SKIP, "the ledger is not signed")
    try:
        valid, reason = check_signature(run_dir, records, public_key)
    except LedgerError as error:
        return Check("signature", SKIP, str(error))
    return Check("signature", PASS if valid else FAIL, reason)


def _genesis_config(genesis: dict[str, Any]):
    try:
        return config_from_dict(genesis.get("config") or {}, "the genesis record")
    except ConfigError:
        return None


def _config_checks(run_dir: Path, records: list[dict[str, Any]]) -> list[Check]:
    checks = []
    for record in records:
        if record.get("config") is None:
            continue
        label = f"config ({record['kind']} record {record.get('index')})"
        try:
            fingerprint = config_from_dict(record["config"], label).fingerprint()
        except ConfigError as error:
            checks.append(Check(label, FAIL, f"the recorded config is not a valid recipe: {error}"))
            continue
        if fingerprint != record.get("config_sha256"):
            checks.append(Check(label, FAIL, "the recorded config does not hash to the recorded config_sha256"))
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        checks.append(Check("config", FAIL, f"{path} is missing"))
        return checks
    try:
        current = config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except (ConfigError, ValueError) as error:
        checks.append(Check("config", FAIL, f"{path} is not a valid recipe: {error}"))
        return checks
    expected = recorded_config(records)
    if expected is not None and current.to_dict() == config_from_dict(expected).to_dict():
        checks.append(Check("config", PASS, f"{CONFIG_FILE} is the recorded config (sha256 {current.fingerprint()[:16]}...)"))
    else:
        checks.append(Check("config", FAIL, f"{CONFIG_FILE} differs from the config the ledger last recorded"))
    return checks


def _code_check(genesis: dict[str, Any]) -> Check:
    """Whether this checkout is the code that ran; a run from uncommitted code is always flagged."""
    code = genesis.get("code") or {}
    commit = code.get("commit")
    if commit is None:
        return Check("code", WARN, f"no commit recorded ({code.get('reason', 'not a git checkout')})")
    dirty = f"; the run had uncommitted changes (diff sha256 {code.get('diff_sha256')})" if code.get("dirty") else ""
    here = code_state()
    if here.get("commit") == commit and here.get("diff_sha256") == code.get("diff_sha256"):
        return Check("code", WARN if dirty else PASS, f"this checkout is exactly the code that ran (commit {commit[:12]}){dirty}")
    if git_output(source_root(), "cat-file", "-e", f"{commit}^{{commit}}") is None:
        return Check("code", WARN, f"commit {commit[:12]} is not in this checkout ({source_root()}){dirty}")
    return Check("code", WARN, f"the run used commit {commit[:12]}, which this checkout has, but the checkout is at "
                 f"{str(here.get('commit'))[:12]}{' with other uncommitted changes' if here.get('dirty') else ''}{dirty}")


def initial_weights_sha256(cfg) -> str:
    """The hash of the seed-derived initial weights, streamed tensor by tensor from a meta-device model:
    memory stays at one tensor (one expert's for stacked experts) whatever the model size."""
    from kmodel.model import Model
    from kmodel.model.init import initial_state

    with torch.device("meta"):
        model = Model(cfg.model)
    return sorted_weights_sha256(initial_state(model, cfg.seed, cfg.model.initializer_range))


def _init_check(genesis: dict[str, Any], cfg) -> Check:
    gap = genesis.get("gap")
    if gap is not None:  # --ledger-gap: the chain starts mid-run, from weights it cannot vouch for
        return Check("init_weights", FAIL, f"the ledger starts after a gap at step {gap.get('resumed_from_step')} "
                     f"({gap.get('reason')}): the weights it continued from ({str(gap.get('weights_sha256'))[:16]}...) "
                     "are not covered by this chain")
    source = genesis.get("init_from")
    if source is not None:  # --init-from: the initial weights came from outside; nothing to recompute from a seed
        imported = source.get("imported_from") or {}
        origin = (f"imported from {imported.get('format', 'another format')} files {imported.get('path')} "
                  f"({len(imported.get('files', {}))} files, sha256 recorded)" if imported else f"checkpoint {source.get('checkpoint')}")
        return Check("init_weights", WARN, f"initialised from external weights, not from scratch: {origin}; "
                     f"initial weights sha256 {str(genesis.get('init_weights_sha256'))[:16]}...")
    if cfg is None:
        return Check("init_weights", FAIL, "the genesis record holds no valid config to rebuild the model from")
    recomputed = initial_weights_sha256(cfg)
    if recomputed == genesis.get("init_weights_sha256"):
        return Check("init_weights", PASS, f"seed {cfg.seed} and the config reproduce the initial weights ({recomputed[:16]}...)")
    return Check("init_weights", FAIL, f"the initial weights recorded are not those of seed {cfg.seed} with this config "
                 f"(recorded {str(genesis.get('init_weights_sha256'))[:16]}..., recomputed {recomputed[:16]}...)")


def _tokenizer_checks(run_dir: Path, records: list[dict[str, Any]], cfg) -> list[Check]:
    from kmodel.tokenizer import Tokenizer

    expected = records[0].get("tokenizer_sha256")
    if expected is None:
        return [Check("tokenizer", SKIP, "no tokenizer fingerprint recorded")]
    checks = []
    places = [(c.name, c / TOKENIZER_DIR) for c in list_checkpoints(run_dir) if (c / TOKENIZER_DIR).is_dir()]
    if cfg is not None and cfg.data is not None:
        from kmodel.data import load_tokenizer

        try:
            places.append((f"data.tokenizer ({cfg.data.tokenizer})", load_tokenizer(cfg.data.tokenizer).directory))
        except (OSError, ValueError) as error:
            checks.append(Check("tokenizer", WARN, f"the configured tokenizer {cfg.data.tokenizer!r} cannot be loaded here: {error}"))
    for label, directory in places:
        try:
            fingerprint = Tokenizer.load(directory).fingerprint()
        except (OSError, ValueError) as error:
            checks.append(Check(f"tokenizer {label}", FAIL, f"cannot load {directory}: {error}"))
            continue
        status = PASS if fingerprint == expected else FAIL
        checks.append(Check(f"tokenizer {label}", status, "matches the recorded fingerprint" if status == PASS
                            else f"fingerprint {fingerprint[:16]}... is not the recorded {expected[:16]}..."))
    return checks


def _data_checks(genesis: dict[str, Any], cfg, data_root: str | Path | None) -> list[Check]:
    from kmodel.data import DataError, data_manifest, manifest_differences

    recorded = genesis.get("data_manifest")
    if not isinstance(recorded, dict) or "sources" not in recorded:
        return [Check("data", SKIP, "no data manifest recorded")]
    leaves = [f["sha256"] for s in recorded["sources"] for f in s["files"]] + [f["sha256"] for f in recorded["heldout"]]
    checks = []
    if merkle_root(leaves) != recorded.get("merkle_root"):
        checks.append(Check("data merkle_root", FAIL, "the recorded Merkle root does not cover the recorded file hashes"))
    if cfg is None or cfg.data is None:
        return checks + [Check("data", FAIL, "the genesis config has no data section to re-hash")]
    try:
        with contextlib.chdir(data_root) if data_root is not None else contextlib.nullcontext():
            current = data_manifest(cfg.data)
    except (DataError, OSError) as error:
        return checks + [Check("data", FAIL, f"cannot re-hash the training data here: {error} "
                               "(relative paths are resolved from the directory the run started in; see --data-root)")]
    changed = manifest_differences(recorded, current)
    if changed:
        checks.append(Check("data", FAIL, "data differs from the recorded manifest: " + "; ".join(changed)))
    else:
        files = len(leaves)
        checks.append(Check("data", PASS, f"{files} files re-hashed; Merkle root {current['merkle_root'][:16]}... as recorded"))
    return checks


def _checkpoint_checks(run_dir: Path, records: list[dict[str, Any]], cfg) -> list[Check]:
    checks = []
    recorded_steps = set()
    redone = superseded(records)
    for position, record in enumerate(records):
        if record.get("kind") != "checkpoint":
            continue
        step = record.get("step")
        recorded_steps.add(step)
        name = f"checkpoint {step}"
        if position in redone:
            checks.append(Check(name, SKIP, f"record {position} was redone: the run later resumed from an older "
                                "checkpoint and recorded this step again (checked there)"))
            continue
        directory = Path(record.get("checkpoint", ""))
        directory = directory if directory.is_absolute() else run_dir / directory
        if not directory.is_dir():
            checks.append(Check(name, SKIP, f"{directory} is gone (pruned by train.keep_checkpoints?)"))
            continue
        try:
            verify_manifest(directory)
            actual = checkpoint_hashes(directory)
        except (CheckpointError, LedgerError) as error:
            checks.append(Check(name, FAIL, str(error)))
            continue
        wrong = [field for field in CHECKPOINT_HASH_FIELDS if record.get(field) != actual[field]]
        wrong += [f"state part {part!r}" for part in sorted(set(record.get("state_parts", {})) | set(actual["state_parts"]))
                  if record.get("state_parts", {}).get(part) != actual["state_parts"].get(part)]
        if cfg is not None:
            try:
                if load_config_from_checkpoint(directory).model != cfg.model:
                    wrong.append(f"{CONFIG_FILE} (another model config)")
            except CheckpointError as error:
                wrong.append(str(error))
        if wrong:
            checks.append(Check(name, FAIL, "does not match its ledger record: " + ", ".join(wrong)))
        else:
            checks.append(Check(name, PASS, "files, model, optimizer, RNG and data-position hashes match the record"))
    unrecorded = [c.name for c in list_checkpoints(run_dir) if step_of(c) not in recorded_steps]
    if unrecorded:
        checks.append(Check("unrecorded", FAIL, f"checkpoints on disk that the ledger never recorded: {', '.join(unrecorded)}"))
    else:
        checks.append(Check("unrecorded", PASS, "every checkpoint on disk is in the ledger"))
    return checks


def _metrics_check(run_dir: Path, records: list[dict[str, Any]]) -> Check:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return Check("metrics", SKIP, f"no {METRICS_FILE}")
    logged = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train" and "loss" in row:
            logged[row["step"]] = row["loss"]
    compared, disagree = 0, []
    redone = superseded(records)
    for record in [r for position, r in enumerate(records) if r.get("kind") == "checkpoint" and position not in redone]:
        if record["step"] in logged and isinstance(record.get("loss"), float):
            compared += 1
            if logged[record["step"]] != record["loss"]:
                disagree.append(f"step {record['step']}: metrics {logged[record['step']]} vs ledger {record['loss']}")
    if disagree:
        return Check("metrics", FAIL, "metrics.jsonl disagrees with the ledger: " + "; ".join(disagree[:5]))
    if not compared:
        return Check("metrics", SKIP, "no recorded step was logged in metrics.jsonl")
    return Check("metrics", PASS, f"the loss of {compared} recorded steps matches metrics.jsonl")


def failed(checks: list[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{c.status.upper():<5} {c.name:<{width}}  {c.reason}" for c in checks]
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, WARN, SKIP)}
    lines.append(f"\n{counts[PASS]} passed, {counts[FAIL]} failed, {counts[WARN]} warnings, {counts[SKIP]} skipped")
    return "\n".join(lines)


def checks_as_dicts(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
