"""`kmodel provenance replay DIR --from STEP --steps K`: retrain a recorded segment and compare.

The replay restores the checkpoint of step STEP (or, for STEP 0, builds the model from the seed alone, or for a
run started with --init-from loads the checkpoint it started from again, verified against the genesis),
regenerates the batches from the seed and the data manifest through the run's own data pipeline, trains
K steps with the trainer, and at every checkpoint the ledger recorded on the way compares the batch
digest, loss, learning rate and gradient norm, and the hashes of the weights, optimizer and RNG state.

On CPU in deterministic mode the result must be bit-identical. Elsewhere (CUDA kernels are not bitwise
reproducible) the segment is replayed twice: the distance between the two replays' weights is what
nondeterminism alone produces, and the replay passes when its distance to the recorded checkpoint is
within `tolerance_factor` times that (plus a floor for when the two replays happen to agree exactly).
That needs the recorded checkpoint at the end of the segment to still exist, since the ledger keeps
hashes, not weights.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kmodel.checkpoint import MANIFEST_FILE, read_weights, save_checkpoint
from kmodel.config import Config, config_from_dict
from kmodel.hashing import sha256_file
from kmodel.ledger import (
    BatchDigest,
    LedgerError,
    checkpoint_hashes,
    current_checkpoint_records,
    load_chain,
)
from kmodel.provenance.verify import recorded_config

# Exact comparisons on a bit-exact replay; each is (record field, what it is).
EXACT_FIELDS = (
    ("batch_digest", "batches"),
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("weights_sha256", "weights"),
    ("optimizer_sha256", "optimizer state"),
    ("rng_sha256", "RNG state"),
)
DEFAULT_TOLERANCE_FACTOR = 4.0
TOLERANCE_FLOOR = 1e-6  # relative L2 distance


class ReplayError(RuntimeError):
    """A segment that cannot be replayed as asked (no such checkpoint, pruned, data changed)."""


@dataclass
class StepComparison:
    step: int
    matches: dict[str, bool]
    replayed: dict[str, Any]
    recorded: dict[str, Any]
    weight_distance: float | None = None  # relative L2 to the recorded checkpoint, when it exists
    tolerance: float | None = None

    @property
    def passed(self) -> bool:
        if self.tolerance is not None:
            return self.matches["batch_digest"] and self.weight_distance is not None and self.weight_distance <= self.tolerance
        return all(self.matches.values())


@dataclass
class ReplayResult:
    from_step: int
    steps: int
    device: str
    bit_exact_expected: bool
    comparisons: list[StepComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def as_dict(self) -> dict[str, Any]:
        return {
            "from_step": self.from_step,
            "steps": self.steps,
            "device": self.device,
            "bit_exact_expected": self.bit_exact_expected,
            "passed": self.passed,
            "checkpoints": [
                {"step": c.step, "passed": c.passed, "matches": c.matches, "replayed": c.replayed,
                 "recorded": c.recorded, "weight_distance": c.weight_distance, "tolerance": c.tolerance}
                for c in self.comparisons
            ],
        }


class _BatchRecorder:
    """Stands in for the trainer's ledger during a replay: digests the batches the trainer draws."""

    def __init__(self):
        self.batches = BatchDigest()

    def observe_batch(self, input_ids) -> None:
        self.batches.observe(input_ids)


def _checkpoint_dir(run_dir: Path, record: dict[str, Any]) -> Path:
    location = Path(record["checkpoint"])
    return location if location.is_absolute() else run_dir / location


def _initial_checkpoint(genesis: dict[str, Any]) -> Path | None:
    """The checkpoint a run started from with --init-from (None for a run from the seed); a ReplayError when it
    is gone or no longer the one the genesis recorded."""
    source = genesis.get("init_from")
    if source is None:
        return None
    checkpoint = Path(source["checkpoint"])
    if not (checkpoint / MANIFEST_FILE).is_file():
        raise ReplayError(f"the run started from {checkpoint} (--init-from), which is gone: step 0 cannot be rebuilt; "
                          "replay a segment that starts at one of this run's own checkpoints")
    if sha256_file(checkpoint / MANIFEST_FILE) != source["manifest_sha256"]:
        raise ReplayError(f"{checkpoint} is no longer the checkpoint this run started from (its manifest hash differs "
                          "from the genesis record's): step 0 cannot be rebuilt")
    return checkpoint


def replayable_segments(run_dir: str | Path) -> list[tuple[int, int]]:
    """(from_step, steps) of every segment between consecutive recorded checkpoints whose start can be
    restored: step 0 (the seed, or the --init-from checkpoint while it is unchanged) or a checkpoint still on disk."""
    run_dir = Path(run_dir)
    chain = load_chain(run_dir)
    records = current_checkpoint_records(chain)
    try:
        _initial_checkpoint(chain[0])
        start_restorable = True
    except ReplayError:
        start_restorable = False
    segments = []
    previous = 0
    for record in records:
        if (previous == 0 and start_restorable) or any(_checkpoint_dir(run_dir, r).is_dir() for r in records if r["step"] == previous):
            segments.append((previous, record["step"] - previous))
        previous = record["step"]
    return segments


def random_segments(run_dir: str | Path, count: int, seed: int | None = None) -> list[tuple[int, int]]:
    """`count` segments drawn at random (without replacement) from the replayable ones."""
    segments = replayable_segments(run_dir)
    if not segments:
        raise ReplayError(f"{run_dir}: no replayable segment (no checkpoint record, or every start pruned)")
    return sorted(random.Random(seed).sample(segments, min(count, len(segments))))


def _segment_config(records: list[dict[str, Any]], from_step: int, device: str | None) -> Config:
    """The config the run used for this segment (the latest genesis/resume config before it)."""
    index = next((i for i, r in enumerate(records) if r.get("kind") == "checkpoint" and r["step"] > from_step), len(records))
    config = recorded_config(records, index)
    if config is None:
        raise ReplayError("the ledger records no config to replay with")
    cfg = config_from_dict(config, "the ledger's recorded config")
    if device is not None:
        cfg.train.device = device
    return cfg


def _relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / max(den, 1e-300)) ** 0.5


def _run_segment(cfg: Config, run_dir: Path, from_step: int, targets: list[dict[str, Any]], work: Path):
    """Train from `from_step` through the target steps; yields (record, replayed values, weights)."""
    from kmodel.train import Trainer

    records = load_chain(run_dir)
    trainer = Trainer(cfg, work / "run", progress=False)
    if from_step > 0:
        start = next(r for r in current_checkpoint_records(records) if r["step"] == from_step)
        trainer.restore(_checkpoint_dir(run_dir, start))
    elif (initial := _initial_checkpoint(records[0])) is not None:  # as `kmodel train --init-from` started it
        trainer.init_from(initial, keep_optimizer=records[0]["init_from"]["optimizer"] == "kept")
    recorder = _BatchRecorder()
    trainer.ledger = recorder
    for target in targets:
        while trainer.step < target["step"]:
            last = trainer.train_step()
        directory = work / f"step_{target['step']}"
        save_checkpoint(directory, trainer.model, trainer.cfg, state=trainer.state_dict())
        hashes = checkpoint_hashes(directory, target)  # made as the recorded ones were
        replayed = {
            "batch_digest": recorder.batches.hexdigest(),
            "loss": last.get("loss"),
            "lr": last.get("lr"),
            "grad_norm": last.get("grad_norm"),
            "weights_sha256": hashes["weights_sha256"],
            "optimizer_sha256": hashes["optimizer_sha256"],
            "rng_sha256": hashes["rng_sha256"],
        }
        weights = read_weights(directory)
        shutil.rmtree(directory)
        recorder.batches = BatchDigest()
        yield target, replayed, weights


def replay(
    run_dir: str | Path,
    from_step: int,
    steps: int | None = None,
    *,
    device: str | None = None,
    tolerance_factor: float = DEFAULT_TOLERANCE_FACTOR,
    work_dir: str | Path | None = None,
    data_root: str | Path | None = None,
) -> ReplayResult:
    """Replay `steps` steps from recorded step `from_step` (to the next recorded checkpoint by default).
    `data_root`: the directory the run was started from, where the recipe's relative data paths resolve."""
    run_dir = Path(run_dir).resolve()
    work_dir = None if work_dir is None else Path(work_dir).resolve()
    records = load_chain(run_dir)
    checkpoints = current_checkpoint_records(records)
    steps_recorded = [r["step"] for r in checkpoints]
    if from_step != 0 and from_step not in steps_recorded:
        raise ReplayError(f"step {from_step} is not a recorded checkpoint; recorded steps: {steps_recorded}")
    if from_step != 0 and not _checkpoint_dir(run_dir, checkpoints[steps_recorded.index(from_step)]).is_dir():
        raise ReplayError(f"the checkpoint of step {from_step} is gone (pruned by train.keep_checkpoints?); "
                          f"replayable segments: {replayable_segments(run_dir)}")
    later = [r for r in checkpoints if r["step"] > from_step]
    if not later:
        raise ReplayError(f"no checkpoint was recorded after step {from_step}; nothing to compare a replay with")
    end = later[0]["step"] if steps is None else from_step + steps
    if end not in steps_recorded:
        raise ReplayError(f"step {end} (= {from_step} + {steps}) is not a recorded checkpoint; the segment must end at "
                          f"one of {[s for s in steps_recorded if s > from_step]}")
    targets = [r for r in later if r["step"] <= end]
    cfg = _segment_config(records, from_step, device)
    if from_step == 0 and records[0].get("init_weights_sha256") is None:
        raise LedgerError("the genesis record has no init_weights_sha256 to start a replay from step 0")

    from kmodel.train.trainer import resolve_device

    resolved = resolve_device(cfg.train.device)
    environment = _recorded_environment(records, from_step)
    recorded_on_cpu = str(environment.get("device") or "cpu").startswith("cpu")
    bit_exact = resolved.type == "cpu" and recorded_on_cpu and cfg.provenance.deterministic
    threads = environment.get("torch_threads")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # CPU reductions split work by thread; the same split gives the same bits
    result = ReplayResult(from_step, end - from_step, str(resolved), bit_exact)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="kmodel-replay-") as tmp:
        try:
            with contextlib.chdir(data_root) if data_root is not None else contextlib.nullcontext():
                first = list(_run_segment(cfg, run_dir, from_step, targets, Path(tmp) / "first"))
                second = None if bit_exact else list(_run_segment(cfg, run_dir, from_step, targets, Path(tmp) / "second"))
        finally:
            torch.set_num_threads(previous_threads)
        for i, (record, replayed, weights) in enumerate(first):
            recorded = {name: record.get(name) for name, _ in EXACT_FIELDS}
            matches = {name: replayed[name] == recorded[name] for name, _ in EXACT_FIELDS}
            comparison = StepComparison(record["step"], matches, replayed, recorded)
            saved = _checkpoint_dir(run_dir, record)
            if saved.is_dir():
                comparison.weight_distance = _relative_distance(weights, read_weights(saved))
            if second is not None:
                noise = _relative_distance(weights, second[i][2])
                comparison.tolerance = max(tolerance_factor * noise, TOLERANCE_FLOOR)
            result.comparisons.append(comparison)
    return result


def _recorded_environment(records: list[dict[str, Any]], from_step: int) -> dict[str, Any]:
    """The environment the run had during this segment (genesis, or the last resume record before it)."""
    environment: dict[str, Any] = {}
    for record in records:
        if record.get("kind") == "checkpoint" and record["step"] > from_step:
            break
        if record.get("kind") in ("genesis", "resume"):
            environment = record.get("environment") or environment
    return environment


def format_result(result: ReplayResult) -> str:
    mode = "bit-exact (CPU, deterministic)" if result.bit_exact_expected else "within tolerance (two replays calibrate it)"
    lines = [f"replay of steps {result.from_step}..{result.from_step + result.steps} on {result.device}, expected {mode}"]
    for c in result.comparisons:
        status = "PASS" if c.passed else "FAIL"
        differing = [label for name, label in EXACT_FIELDS if not c.matches[name]]
        detail = "identical batches, loss, lr, grad norm, weights, optimizer and RNG state" if not differing \
            else "differs in " + ", ".join(differing)
        if c.weight_distance is not None and differing:
            detail += f"; relative weight distance {c.weight_distance:.3g}"
        if c.tolerance is not None:
            detail += f" (tolerance {c.tolerance:.3g})"
        lines.append(f"{status} step {c.step}: {detail}")
    lines.append("replay " + ("PASSED" if result.passed else "FAILED"))
    return "\n".join(lines)
