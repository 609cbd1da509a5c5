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

import yaml

from kmodel.checkpoint import (
    MANIFEST_FILE,
    TOKENIZER_DIR,
    CheckpointError,
    list_checkpoints,
    load_config_from_checkpoint,
    verify_manifest,
)
from kmodel.config import ConfigError, config_from_dict
from kmodel.hashing import merkle_root, sha256_file
from kmodel.ledger import (
    SIGNATURE_FILE,
    LedgerError,
    chain_problems,
    check_signature,
    checkpoint_hashes,
    code_state,
    git_output,
    initial_weights_sha256,
    read_records,
    source_root,
    superseded,
)
from kmodel.rundir import CONFIG_FILE, LEDGER_FILE, METRICS_FILE, RunDir, step_of
from kmodel.train.run import config_changes

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
    """Every check of the module docstring, in order; for a run started from another run's checkpoint (a stage),
    then every stage before it back to genesis, as `stage_checks` describes."""
    run_dir = Path(run_dir)
    options = {"check_init": check_init, "check_data": check_data, "data_root": data_root}
    checks = _run_checks(run_dir, public_key=public_key, **options)
    return checks + stage_checks(run_dir, checks, options)


def _run_checks(
    run_dir: Path, *, check_init: bool, check_data: bool, data_root: str | Path | None, public_key: str | None
) -> list[Check]:
    """The checks of one run directory's own ledger (one stage)."""
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
    if check_init or genesis.get("init_from") is not None:  # a stage or an import: hashes compared, nothing rebuilt
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


def _init_check(genesis: dict[str, Any], cfg) -> Check:
    gap = genesis.get("gap")
    if gap is not None:  # --ledger-gap: the chain starts mid-run, from weights it cannot vouch for
        return Check("init_weights", FAIL, f"the ledger starts after a gap at step {gap.get('resumed_from_step')} "
                     f"({gap.get('reason')}): the weights it continued from ({str(gap.get('weights_sha256'))[:16]}...) "
                     "are not covered by this chain")
    source = genesis.get("init_from")
    link = (source or {}).get("previous_stage")
    if link is not None and not _well_formed(link):
        return Check("init_weights", FAIL, f"the link to the previous stage is malformed (stage {link.get('stage')!r})"
                     if isinstance(link, dict) else "the link to the previous stage is malformed")
    if link is not None:  # a stage: the weights were read (verified) from the checkpoint the previous ledger records
        stage, loaded = link.get("stage"), source.get("manifest_sha256")
        if loaded == link.get("manifest_sha256"):
            return Check("init_weights", PASS, f"stage {stage + 1}: the initial weights are stage {stage}'s checkpoint "
                         f"of step {link.get('step')} (manifest sha256 {str(loaded)[:16]}...; initial weights sha256 "
                         f"{str(genesis.get('init_weights_sha256'))[:16]}...); `stage {stage} link` checks it against "
                         "that stage's ledger")
        return Check("init_weights", FAIL, f"the checkpoint the initial weights were read from (manifest sha256 "
                     f"{str(loaded)[:16]}...) is not the stage {stage} checkpoint this run links to "
                     f"({str(link.get('manifest_sha256'))[:16]}...)")
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
            actual = checkpoint_hashes(directory, record)  # made as the record made them
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


# --- stages: a run started from another run's checkpoint (--init-from) -------------------------------------

# The checks a claim of "from scratch" rests on, in every stage (with each `stage K link`).
LINEAGE_CHECKS = ("chain", "init_weights")
# What kind of change a recipe key is, for the report of what a stage changed (first matching prefix).
STAGE_CHANGE_KINDS = (
    ("seq_len", ("data.seq_len",)),
    ("rope", ("model.rope_", "model.max_position_embeddings")),
    ("data", ("data.",)),
    ("batch", ("train.micro_batch_size", "train.grad_accum_steps", "parallel.global_batch_size")),
    ("schedule", ("train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.schedule", "train.decay_fraction",
                  "train.max_steps")),
    ("optimizer", ("train.optimizer", "train.beta", "train.adam_eps", "train.weight_decay", "train.decay_embeddings",
                   "train.muon", "train.adamw_params", "train.qk_clip_tau", "train.grad_clip")),
    ("layout", ("parallel.",)),
    ("loss", ("model.",)),
    ("other", ("",)),
)


def _previous_stage(records: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if not records or records[0].get("kind") != "genesis":
        return None
    link = (records[0].get("init_from") or {}).get("previous_stage")
    return link if _well_formed(link) else None


def _well_formed(link: Any) -> bool:
    return isinstance(link, dict) and isinstance(link.get("stage"), int) and link["stage"] >= 1


def _readable_records(run_dir: Path) -> list[dict[str, Any]] | None:
    try:
        return read_records(run_dir)[0]
    except LedgerError:
        return None


def locate_stage(link: dict[str, Any], newer_run: Path) -> Path | None:
    """The run directory of the stage a link names: where it was, or beside the newer stage's run (runs moved
    together); None when neither holds a ledger."""
    recorded = Path(link.get("run_dir", ""))
    for candidate in (recorded, newer_run.parent / recorded.name):
        if (candidate / LEDGER_FILE).is_file():
            return candidate
    return None


def stage_checks(run_dir: Path, own_checks: list[Check], options: dict[str, Any]) -> list[Check]:
    """Walk a run's stages back to genesis through the links in each genesis: every earlier stage's own checks
    (named `stage K ...`), its link (`stage K link`: its ledger still holds the head and the checkpoint record
    the next stage started from, and that checkpoint, when still on disk, is the one), what the next stage
    changed (`stage K+1 changes`), and the verdict on the whole `history` ("from scratch, N stages" only when
    the first stage's weights come from the seed and every link holds). Nothing for a run that is no stage."""
    records = _readable_records(run_dir)
    link = _previous_stage(records)
    if link is None:  # one run: its own checks say it all
        return []
    newer_run, newer_genesis, number = run_dir, records[0], link["stage"] + 1
    checks, seen, count = [], {run_dir.resolve()}, 1
    lineage = [c for c in own_checks if c.name in LINEAGE_CHECKS]  # newest stage first
    while link is not None:
        stage = link["stage"]
        found = locate_stage(link, newer_run)
        if found is None or found.resolve() in seen:
            why = "is gone" if found is None else "is a later stage of this history (a loop)"
            checks.append(Check(f"stage {stage}", FAIL, f"the run directory of stage {stage} ({link.get('run_dir')}, "
                                f"or {newer_run.parent / Path(link.get('run_dir', '')).name}) {why}: the history before "
                                f"stage {stage + 1} cannot be verified"))
            return checks + [Check("history", FAIL, f"cannot be traced back to genesis: stage {stage} "
                                   f"({link.get('run_dir')}) {why}; stages {stage + 1} to {number} are checked above")]
        seen.add(found.resolve())
        earlier = [Check(f"stage {stage} {c.name}", c.status, c.reason) for c in
                   _run_checks(found, public_key=None, **options)]
        previous_records = _readable_records(found)
        link_check = _link_check(link, found, previous_records)
        checks += earlier + [link_check, _changes_check(link, previous_records, newer_genesis)]
        lineage += [link_check] + [c for c in earlier if c.name.removeprefix(f"stage {stage} ") in LINEAGE_CHECKS]
        link, newer_run, newer_genesis = _previous_stage(previous_records), found, (previous_records or [{}])[0]
        count += 1
    return checks + [_history_check(lineage, count)]


def _link_check(link: dict[str, Any], run_dir: Path, records: list[dict[str, Any]] | None) -> Check:
    """Whether stage K's ledger holds what stage K+1's genesis pinned of it."""
    stage, name = link["stage"], f"stage {link['stage']} link"
    if records is None:
        return Check(name, FAIL, f"{run_dir / LEDGER_FILE} cannot be read")
    problems = []
    pinned, head = link.get("checkpoint_record") or {}, link.get("ledger_head") or {}

    def at(index):
        return records[index] if isinstance(index, int) and 0 <= index < len(records) else {}

    record = at(pinned.get("index"))
    if record.get("hash") != pinned.get("hash") or record.get("kind") != "checkpoint":
        problems.append(f"record {pinned.get('index')} is not the checkpoint record stage {stage + 1} started from "
                        "(its ledger was rewritten)")
    else:
        problems += [f"the record's {key} is not the one linked" for key in
                     ("step", "manifest_sha256", "tensor_root", "weights_sha256") if record.get(key) != link.get(key)]
    if at(head.get("index")).get("hash") != head.get("hash"):
        problems.append(f"its ledger no longer holds the head stage {stage + 1} linked to (record {head.get('index')}, "
                        f"hash {str(head.get('hash'))[:16]}...): records were rewritten")
    before = _previous_stage(records)
    if (before["stage"] + 1 if before else 1) != stage:
        problems.append(f"it calls itself stage {before['stage'] + 1 if before else 1}, the link stage {stage}")
    run_id = RunDir(run_dir).read_run_id()
    if link.get("run_id") and run_id and run_id != link["run_id"]:
        problems.append(f"it is another run (run id {run_id}, linked {link['run_id']})")
    on_disk = run_dir / str(record.get("checkpoint", "")) if record.get("checkpoint") else None
    if on_disk is not None and (on_disk / MANIFEST_FILE).is_file():
        if sha256_file(on_disk / MANIFEST_FILE) != link.get("manifest_sha256"):
            problems.append(f"{on_disk}/{MANIFEST_FILE} is not the manifest stage {stage + 1} started from")
        kept = f"{on_disk.name} on disk"
    else:
        kept = "the checkpoint itself is pruned"
    if problems:
        return Check(name, FAIL, f"stage {stage} ({run_dir}) does not hold what stage {stage + 1} started from: "
                     + "; ".join(problems))
    return Check(name, PASS, f"stage {stage + 1} started from step {link.get('step')} of stage {stage} ({run_dir}): its "
                 f"ledger records that checkpoint (record {pinned.get('index')}, manifest sha256 "
                 f"{str(link.get('manifest_sha256'))[:16]}..., Merkle root {str(link.get('tensor_root'))[:16]}...) and still "
                 f"holds the head linked (record {head.get('index')}); {kept}")


def _shown(key: str, value: Any) -> str:
    if key == "data.sources" and isinstance(value, list):  # the mixture: names and weights
        return "{" + ", ".join(f"{s.get('name')}: {s.get('weight')}" for s in value if isinstance(s, dict)) + "}"
    if isinstance(value, dict):  # a section set or unset as a whole (model.rope_scaling): its values that are set
        value = {k: v for k, v in value.items() if v is not None}
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def _changes_check(link: dict[str, Any], records: list[dict[str, Any]] | None, newer_genesis: dict[str, Any]) -> Check:
    """What stage K+1's recipe changed from the one stage K's checkpoint was trained with, by kind."""
    stage = link["stage"] + 1
    name = f"stage {stage} changes"
    if records is None:
        return Check(name, SKIP, f"stage {stage - 1}'s ledger cannot be read")
    old = recorded_config(records, (link.get("checkpoint_record") or {}).get("index")) or {}
    changed = config_changes(old, newer_genesis.get("config") or {})
    kinds: dict[str, list[str]] = {}
    for key, (before, after) in changed.items():
        kind = next(kind for kind, prefixes in STAGE_CHANGE_KINDS if key.startswith(prefixes))
        kinds.setdefault(kind, []).append(f"{key} {_shown(key, before)} -> {_shown(key, after)}")
    roots = [(r[0].get("data_manifest") or {}).get("merkle_root") for r in (records, [newer_genesis])]
    if roots[0] != roots[1]:
        kinds.setdefault("data", []).append(f"data files Merkle root {str(roots[0])[:12]}... -> {str(roots[1])[:12]}...")
    moments = (newer_genesis.get("init_from") or {}).get("optimizer", "unknown")
    parts = [f"{kind}: {'; '.join(kinds[kind])}" for kind, _ in STAGE_CHANGE_KINDS if kind in kinds]
    return Check(name, PASS, f"from stage {stage - 1} step {link.get('step')}: " + (" | ".join(parts) or "no recipe "
                 "key changed") + f" | optimizer moments {moments}, schedule restarted at step 0")


def _history_check(lineage: list[Check], stages: int) -> Check:
    """The verdict on the chain of stages, newest first: every ledger chain, initial weights and link must
    hold, and the first stage's initial weights decide between from scratch and external weights."""
    count = f"{stages} stage{'s' if stages > 1 else ''}"
    broken = [c.name for c in lineage if c.status == FAIL]
    if broken:
        return Check("history", FAIL, f"not shown to be from scratch ({count}): {', '.join(broken)} failed")
    first = lineage[-1]  # the first stage's init_weights (its chain held, so its genesis was read)
    if first.status == SKIP:
        return Check("history", SKIP, f"{count} back to genesis; from scratch not checked ({first.reason})")
    if first.status == WARN:
        return Check("history", WARN, f"from external weights, {count}: {first.reason}")
    return Check("history", PASS, f"from scratch, {count}")


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
