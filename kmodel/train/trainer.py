"""The training loop: one Trainer per run directory.

    trainer = Trainer(cfg, run_dir)          # tokenizer, data, model (seed-initialised), optimizer
    trainer.restore(checkpoint)              # or start fresh
    trainer.start_ledger(resume=...)         # provenance, when cfg.provenance.ledger
    trainer.fit()                            # steps, metrics, periodic eval, checkpoints
    trainer.finish()                         # held-out eval, plots, summary

A step is `accumulation` micro-batches, each `next_micro_batch` -> `forward_backward`, then
`clip_gradients` and `optimizer_step`; a distributed engine replaces the last three. A step whose loss or
gradient norm is not finite is skipped (no update, logged); `max_bad_steps` in a row stop the run with
the checkpoints already written untouched. On CPU with deterministic algorithms, the losses of a run
resumed from any checkpoint are bit-identical to the uninterrupted run's: the checkpoint holds the
weights, AdamW moments, RNG states and the data position, and the learning rate is a function of the step.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from kmodel.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    Manifest,
    LazyTensor,
    TensorStream,
    list_checkpoints,
    load_config_from_checkpoint,
    load_weights_into,
    read_state,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from kmodel.checkpoint.writer import CheckpointWriter, snapshot
from kmodel.config import Config
from kmodel.data import (
    Batch,
    DataError,
    data_manifest,
    default_cache_dir,
    file_docs,
    load_tokenizer,
    manifest_differences,
    relocations,
    training_mixture,
)
from kmodel.hashing import sha256_file, weights_sha256
from kmodel.ledger import Ledger, continuation_problem, set_aside
from kmodel.model import build_model
from kmodel.rundir import CHECKPOINTS_DIR, LEDGER_FILE, step_dir_name
from kmodel.train.evaluate import combine_results, evaluate_docs
from kmodel.train.flops import peak_flops, training_flops_per_token
from kmodel.train.metrics import MetricsLog, WandbLog
from kmodel.train.muon import QKClip
from kmodel.train.optim import build_optimizer
from kmodel.train.schedule import lr_at
from kmodel.train.watch import HangWatchdog, StopSignals, TrainingInterrupted, directory_bytes, make_room

LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "z_loss")
# Model keys a new stage (--init-from another run's checkpoint) may change: they shape positions and the loss,
# not the weights (context extension: DeepSeek-V3 and K-EXAONE change RoPE; DeepSeek-V3 lowered the MTP weight
# and stopped the balancing bias late in training). Every other model key is the architecture.
STAGE_MODEL_KEYS = (
    "max_position_embeddings", "rope_theta", "rope_scaling", "rope_local_base_freq", "aux_loss_coef",
    "router_z_loss_coef", "router_bias_update_rate", "mtp_loss_coef", "mtp_loss_weights", "logits_z_loss_coef",
)


def delete_checkpoint(path: Path) -> None:
    # Renamed first so a kill mid-delete never leaves a half-deleted directory under a checkpoint name.
    doomed = path.with_name(f".{path.name}.deleting")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA ('auto') or wherever 'bf16' is asked for; None means plain fp32."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_deterministic_algorithms() -> None:
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first CUDA matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, *, progress: bool | None = None, cache_dir: Path | None = None):
        if cfg.data is None:
            raise DataError("the recipe has no data: section; training needs data.sources")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.progress = sys.stderr.isatty() if progress is None else progress
        if cfg.provenance.deterministic:
            use_deterministic_algorithms()
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = autocast_dtype(cfg.train.dtype, self.device)
        self.cache_dir = default_cache_dir() if cache_dir is None else cache_dir

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.data_manifest = data_manifest(cfg.data)
        self.data = training_mixture(cfg, self.tokenizer, self.data_manifest, self.cache_dir)
        self._heldout = None  # tokenized on first evaluation

        torch.manual_seed(cfg.seed)
        self.model = self.make_model()
        if cfg.train.activation_checkpointing:
            from kmodel.parallel.activation_checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(self.model)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.qk_clip = None if cfg.train.qk_clip_tau is None else QKClip(self.model, cfg.train.qk_clip_tau)
        self.attention_logits: dict[str, list[float]] | None = None  # the last step's per-head maxima (MuonClip)
        self.flops_per_token = training_flops_per_token(self.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device)

        self.step = 0  # optimizer steps taken (skipped ones included)
        self.tokens_seen = 0
        self.bad_steps = 0  # consecutive non-finite steps
        self.last_record: dict[str, Any] = {}
        self.ledger = None
        self.checkpoint_writer = CheckpointWriter(cfg.train.async_checkpoint)
        self.metrics = MetricsLog(self.run_dir)
        self.wandb = None

    def make_model(self) -> torch.nn.Module:
        """The seed-initialised model (engines that shard it at construction override this)."""
        return build_model(self.cfg, self.device)

    @property
    def total_steps(self) -> int:
        return self.cfg.train.max_steps

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum_steps * self.cfg.data.seq_len

    # --- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that a resumed run needs (tensors and plain containers only)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "bad_steps": self.bad_steps,
            "optimizer": self.optimizer_state(),
            "scheduler": {"schedule": self.cfg.train.schedule, "total_steps": self.total_steps},
            "rng": rng,
            "data": self.data.state_dict(),
            "data_manifest": self.data_manifest,
        }

    def optimizer_state(self) -> dict[str, Any]:
        """AdamW's state_dict (full tensors, one entry per parameter); engines gather their shards into it."""
        return self.optimizer.state_dict()

    def optimizer_layout(self) -> list[list[int]]:
        """The one-process parameter indices of each optimizer group, as checkpoints record them (an engine's
        from its one-process layout, known before the engine starts; a pipeline stage's covers every stage)."""
        return [group["params"] for group in self.optimizer.state_dict()["param_groups"]]

    def model_differences(self, ckpt: Path) -> dict[str, tuple[Any, Any]] | None:
        """The model config keys in which a checkpoint's saved recipe differs from this one, each with (the
        checkpoint's value, this recipe's); None: it fits."""
        saved = load_config_from_checkpoint(ckpt)
        if saved.model == self.cfg.model:
            return None
        theirs = saved.model.model_dump(mode="json")
        return {k: (theirs[k], v) for k, v in self.cfg.model.model_dump(mode="json").items() if theirs[k] != v}

    def restore(self, checkpoint: str | Path) -> Path:
        """Continue from a checkpoint of this recipe: weights, optimizer, RNG, data position, counters."""
        ckpt = resolve_checkpoint(checkpoint)
        keys = self.model_differences(ckpt)
        if keys is not None:
            raise CheckpointError(f"checkpoint {ckpt} was trained with another model config (differs in model.{', model.'.join(keys)})")
        self.load_weights(read_weights(ckpt, lazy=True), str(ckpt))
        state = read_state(ckpt, lazy=self.lazy_restore)
        changed = manifest_differences(state["data_manifest"], self.data_manifest)
        if changed:
            raise DataError(f"cannot resume from {ckpt}: the training data changed since: {'; '.join(changed)}")
        moved = relocations(state["data_manifest"], self.data_manifest)
        if moved:
            print(f"note: the training data moved since {ckpt} (same content): {'; '.join(moved)}", file=sys.stderr)
        if state["scheduler"]["total_steps"] != self.total_steps:
            print(f"note: the learning-rate schedule now spans {self.total_steps} steps "
                  f"(was {state['scheduler']['total_steps']}); losses will differ from the original plan", file=sys.stderr)
        self.load_optimizer_state(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.data.load_state_dict(state["data"])
        self.step, self.tokens_seen, self.bad_steps = state["step"], state["tokens_seen"], state["bad_steps"]
        return ckpt

    def init_from(self, checkpoint: str | Path, keep_optimizer: bool | None = None) -> Path:
        """Start from another checkpoint's weights (verified): one imported from Hugging Face, or another run's as
        a new stage, whose recipe may change the keys of STAGE_MODEL_KEYS (context length and RoPE, loss weights)
        and anything outside `model` (data, seq_len, batch, schedule, layout); any other model key is refused,
        each with its old and new value. The step and schedule start at 0; the optimizer's moments are kept
        (`keep_optimizer` None or True, under this recipe's hyperparameters) or started fresh (False). A
        checkpoint with a data state continues as the next data stage. The source is kept for the ledger's
        genesis (`init_source`), which links it to the previous run's ledger."""
        ckpt = resolve_checkpoint(checkpoint)
        fixed = {k: v for k, v in (self.model_differences(ckpt) or {}).items() if k not in STAGE_MODEL_KEYS}
        if fixed:
            details = "; ".join(f"model.{k}: {old!r} -> {new!r}" for k, (old, new) in fixed.items())
            raise CheckpointError(
                f"--init-from {ckpt}: another model config whose weights do not fit this recipe ({details}). A new "
                f"stage may change only model.{', model.'.join(STAGE_MODEL_KEYS)}; set the others as the checkpoint has them"
            )
        self.load_weights(read_weights(ckpt, lazy=True), str(ckpt))
        manifest = Manifest.read(ckpt)
        optimizer = "none"  # an import carries no optimizer state
        if STATE_FILE in manifest.files:
            self.start_stage(ckpt)
            optimizer = "reset" if keep_optimizer is False else "kept"
            if optimizer == "kept":
                self.keep_optimizer_state(ckpt)
        elif keep_optimizer:
            raise CheckpointError(f"--keep-optimizer: {ckpt} holds no optimizer state (no {STATE_FILE}: an import "
                                  "or a weights-only checkpoint); drop --keep-optimizer")
        self.init_source = {"checkpoint": str(ckpt.resolve()), "manifest_sha256": sha256_file(ckpt / MANIFEST_FILE),
                            "files": manifest.digests, "imported_from": manifest.extra.get("imported_from"),
                            "optimizer": optimizer}
        return ckpt

    def keep_optimizer_state(self, ckpt: Path) -> None:
        """A stage's optimizer continues from the checkpoint's moments under this recipe's hyperparameters
        (lr, betas, weight decay ...): refused, pointing to --reset-optimizer, when the optimizer or the way it
        groups the parameters changed, since moments would then land on other parameters."""
        saved_optimizer = load_config_from_checkpoint(ckpt).train.optimizer
        if saved_optimizer != self.cfg.train.optimizer:
            raise CheckpointError(f"--init-from {ckpt}: its optimizer state is {saved_optimizer}'s, and this recipe "
                                  f"trains with train.optimizer {self.cfg.train.optimizer}; pass --reset-optimizer")
        saved = read_state(ckpt, lazy=self.lazy_restore)["optimizer"]
        groups = self.optimizer.state_dict()["param_groups"]
        if [g["params"] for g in saved["param_groups"]] != self.optimizer_layout():
            raise CheckpointError(
                f"--init-from {ckpt}: its optimizer groups the parameters differently from this recipe (changed "
                "train.decay_embeddings, muon_params or adamw_params?); pass --reset-optimizer to start fresh moments"
            )
        self.load_optimizer_state({"state": saved["state"], "param_groups": groups})

    # where a run started from --init-from got its weights (recorded in the ledger's genesis), else None
    init_source: dict[str, Any] | None = None

    def start_stage(self, checkpoint: str | Path) -> None:
        """The data side of a run continued from another run's checkpoint (a stage boundary, `--init-from`): this
        recipe's weights and seq_len in a new order seeded by the next stage index, from its first row; the
        stages before are carried in every checkpoint's data state and in the ledger's genesis. Call before
        `start_ledger`."""
        self.data.start_stage(read_state(resolve_checkpoint(checkpoint), lazy=True)["data"])

    # Whether `restore` hands the optimizer's moments to `load_optimizer_state` unread (LazyTensor), for an
    # engine that places them one tensor at a time.
    lazy_restore = False

    def load_weights(self, weights: Mapping[str, torch.Tensor | LazyTensor], source: str) -> None:
        """Full (topology-free) checkpoint weights into the model, one tensor at a time."""
        load_weights_into(self.model, weights, source)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """A checkpoint's AdamW state_dict (full tensors, one entry per parameter) into the optimizer."""
        self.optimizer.load_state_dict(state)

    # --ledger-gap: a resumed run whose ledger is missing or broken starts a new chain with a gap record
    ledger_gap = False

    def _ledger_gap_reason(self, resume: bool) -> str | None:
        if not (resume and self.ledger_gap):
            return None
        return continuation_problem(self.run_dir, self.step > 0)

    def ledger_exists(self, resume: bool) -> bool:
        """Whether a resumed run continues the ledger on disk (not when --ledger-gap replaces it)."""
        return resume and (self.run_dir / LEDGER_FILE).exists() and self._ledger_gap_reason(resume) is None

    def start_ledger(self, resume: bool, init_weights_sha256: str | None = None) -> None:
        """The provenance ledger hook: genesis for a fresh run (the initial weights' hash: given by an engine
        whose ranks hold shards, else of the model's state), continuation for a resumed one (noting the step
        it continues from), or, with --ledger-gap, a new chain whose genesis states the gap."""
        if not self.cfg.provenance.ledger:
            return
        if self.ledger_exists(resume):
            self.ledger = Ledger.open(self.run_dir, resumed_from_step=self.step)
            return
        reason, gap = self._ledger_gap_reason(resume), None
        if reason is not None:
            previous = set_aside(self.run_dir) if (self.run_dir / LEDGER_FILE).exists() else None
            gap = {"reason": reason, "resumed_from_step": self.step, "previous_ledger": previous}
            print(f"--ledger-gap: {reason}; a new ledger starts at step {self.step} with a gap record", file=sys.stderr)
        init_hash = weights_sha256(self.model) if init_weights_sha256 is None else init_weights_sha256
        data = {**self.data_manifest, "order": self.data.order_record()}  # the data, and its order's stage
        self.ledger = Ledger.create(self.run_dir, self.cfg, init_hash, self.tokenizer, data, self.device,
                                    gap=gap, init_from=self.init_source)

    # --- one step ----------------------------------------------------------------------------------------
    def next_micro_batch(self) -> Batch:
        batch = self.data.next_batch(self.cfg.train.micro_batch_size)
        if self.ledger is not None:
            self.ledger.observe_batch(batch.input_ids)
        return batch.to(self.device)

    def forward_backward(self, batch: Batch) -> dict[str, float]:
        """Loss of one micro-batch, backpropagated with the 1/accumulation weight; returns the loss terms."""
        autocast = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            out = self.model(batch.input_ids, batch.labels, segment_ids=batch.segment_ids)
        (out.loss / self.cfg.train.grad_accum_steps).backward()
        return {k: getattr(out, k).item() for k in LOSS_KEYS if getattr(out, k) is not None}

    def accumulate(self) -> list[dict[str, float]]:
        """The step's micro-batches, each read and backpropagated; their loss terms (a pipeline engine runs them
        all through its schedule at once)."""
        return [self.forward_backward(self.next_micro_batch()) for _ in range(self.cfg.train.grad_accum_steps)]

    def clip_gradients(self) -> float:
        """Global gradient norm (before clipping); clips to train.grad_clip when it is positive."""
        limit = self.cfg.train.grad_clip or float("inf")
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit).item()

    def optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.clip_attention_logits()
        self.model.end_step()  # MoE: aux-loss-free bias update and the step's router load

    def clip_attention_logits(self, applied: bool = True) -> None:
        """MuonClip after an update: read the step's per-head max logits and rescale the query/key weights of
        heads above train.qk_clip_tau (a discarded step only resets the maxima)."""
        if self.qk_clip is None:
            return
        logits = self.qk_clip.step_logits()
        self.attention_logits = {name: value.tolist() for name, value in logits.items()}
        if applied:
            self.scale_rows(self.qk_clip.row_scales(logits))

    def scale_rows(self, scales: dict[str, torch.Tensor]) -> None:
        """Multiply rows of named parameters in place (engines override this to reach their master weights)."""
        QKClip.apply(self.model, scales)

    def discard_step(self) -> None:
        """Drop a non-finite step: no update, and its router counts do not steer the balancing bias."""
        self.clip_attention_logits(applied=False)
        for moe in self.model.moe_layers().values():
            moe.load.zero_()

    def update(self, lr: float, losses: dict[str, float]) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients unless the step is non-finite (then discard it);
        returns (gradient norm before clipping, whether the update was applied). Engines override this."""
        grad_norm = self.clip_gradients()
        finite = all(map(_finite, losses.values())) and _finite(grad_norm)
        if finite:
            self.optimizer_step(lr)
        else:
            self.discard_step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        lr = lr_at(self.step, self.cfg.train, self.total_steps)
        micro = self.accumulate()
        losses = {k: sum(m[k] for m in micro) / len(micro) for k in micro[0]}
        grad_norm, finite = self.update(lr, losses)
        if finite:
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start

        self.step += 1
        self.tokens_seen += self.tokens_per_step
        tokens_per_s = self.tokens_per_step / seconds
        record = {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens_seen,
            **losses,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": None if self.peak_flops is None else self.flops_per_token * tokens_per_s / self.peak_flops,
            "step_seconds": seconds,
            "skipped": not finite,
            "router": self._router_record() if finite else None,
        }
        if self.attention_logits is not None:
            record["attention_logits"] = self.attention_logits
        self.last_record = record
        return record

    def _router_record(self) -> dict[str, Any]:
        return {
            name: {"max_over_mean": s["max_over_mean"], "dead_experts": s["dead_experts"], "load": s["load"]}
            for name, s in self.model.router_stats().items()
        }

    # --- checkpoints -----------------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    def save_checkpoint(self) -> Path:
        """Snapshot the weights and state now; write step_NNNNNNN atomically, record it in the ledger and drop
        checkpoints beyond the last K, on a background thread with train.async_checkpoint (one save in flight)."""
        started = time.perf_counter()
        self.checkpoint_writer.wait()
        self.make_room_for_checkpoint()
        directory = self.checkpoints_dir / step_dir_name(self.step)
        weights = TensorStream.of(snapshot(self.model.state_dict()))
        state = snapshot(self.state_dict())

        def write() -> int:
            manifest = save_checkpoint(directory, weights, self.cfg, tokenizer=self.tokenizer, state=state)
            return sum(r.bytes for r in manifest.files.values())

        self.submit_checkpoint(directory, started, write)
        return directory

    def submit_checkpoint(self, directory: Path, started: float, write: Callable[[], int]) -> None:
        """Hand a save to the checkpoint writer, followed by its ledger record (with the batches digested up to
        now and this step's losses) and the rotation; an engine's ranks pass their own `write`."""
        step, r = self.step, self.last_record
        batches = self.ledger.take_batches() if self.ledger is not None else None

        def write_and_record() -> int:
            written = write()
            if self.ledger is not None:
                self.ledger.record_checkpoint(step=step, loss=r.get("loss"), lr=r.get("lr"), grad_norm=r.get("grad_norm"),
                                              checkpoint_dir=directory, batches=batches)
            self.rotate_checkpoints()
            return written

        self.checkpoint_writer.submit(step, started, write_and_record)

    def log_checkpoint_records(self, wait: bool = False) -> None:
        """Metrics records of finished saves (stall and write time); `wait` for the one in flight first."""
        if wait:
            self.checkpoint_writer.wait()
        for record in self.checkpoint_writer.finished():
            self.log(record)

    def rotate_checkpoints(self) -> None:
        for old in list_checkpoints(self.run_dir)[: -self.cfg.train.keep_checkpoints]:
            delete_checkpoint(old)

    def make_room_for_checkpoint(self) -> None:
        """Before a save: room for one more checkpoint (the size of the newest, else of fp32 weights and two
        AdamW moments), rotating the older ones first when the disk is short."""
        checkpoints = list_checkpoints(self.run_dir)
        if checkpoints:
            need = directory_bytes(checkpoints[-1])
        else:
            need = 12 * sum(p.numel() for p in self.model.parameters())
        make_room(self.checkpoints_dir, int(need * 1.05), checkpoints, delete_checkpoint)

    # --- evaluation ------------------------------------------------------------------------------------------
    @property
    def eval_model(self) -> torch.nn.Module:
        """What held-out evaluation calls as `model(input_ids, labels)` (an engine that splits sequences wraps it)."""
        return self.model

    def evaluate_heldout(self, max_batches: int | None) -> dict[str, Any] | None:
        """Loss, perplexity and bits per byte on data.heldout (None when the recipe has none)."""
        if not self.cfg.data.heldout:
            return None
        if self._heldout is None:
            self._heldout = {path: file_docs(path, self.tokenizer, self.cache_dir) for path in self.cfg.data.heldout}
        per_file = {
            path: evaluate_docs(
                self.eval_model, docs, self.cfg.data.seq_len, self.cfg.train.micro_batch_size, self.tokenizer.pad_id,
                self.amp_dtype, max_batches,
            )
            for path, docs in self._heldout.items()
        }
        return {"kind": "eval", "step": self.step, **combine_results(per_file.values()), "files": per_file}

    # --- the loop ----------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.write(record)

    def fit(self, max_steps: int | None = None) -> None:
        """Train until step `max_steps` (default: train.max_steps; the schedule always spans train.max_steps)."""
        from tqdm import tqdm

        train = self.cfg.train
        stop = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        if self.wandb is None:
            self.wandb = WandbLog(self.run_dir, self.cfg)
        bar = tqdm(total=stop, initial=self.step, unit="step", dynamic_ncols=True, disable=not self.progress,
                   desc=self.cfg.name)
        signals = StopSignals()
        watchdog = HangWatchdog(self.run_dir, self.rank, train.hang_timeout_s)
        try:
            with signals, watchdog:
                self._loop(stop, bar, signals, watchdog)
        except BaseException:
            self._close_wandb()
            raise
        finally:
            bar.close()
            self.log_checkpoint_records(wait=True)

    def _loop(self, stop: int, bar, signals: StopSignals, watchdog: HangWatchdog) -> None:
        train = self.cfg.train
        while self.step < stop:
            watchdog.beat(self.step)
            record = self.train_step()
            if record["skipped"] or self.step % train.log_every == 0 or self.step == stop:
                self.log(record)
            if record["skipped"]:
                print(f"step {self.step}: non-finite loss {record['loss']} or grad norm {record['grad_norm']}; "
                      f"skipped ({self.bad_steps} in a row)", file=sys.stderr)
                if self.bad_steps >= train.max_bad_steps:
                    latest = list_checkpoints(self.run_dir)
                    raise TrainingDiverged(
                        f"{self.bad_steps} consecutive non-finite steps (train.max_bad_steps = {train.max_bad_steps}); "
                        f"stopped at step {self.step}. Last good checkpoint: {latest[-1] if latest else 'none yet'}"
                    )
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if train.eval_every and self.step % train.eval_every == 0 and self.step < stop:
                watchdog.beat(self.step)  # an evaluation and a save each get the whole timeout
                self._log_eval()
            saved = self.step % train.checkpoint_every == 0 or self.step == stop
            if saved:
                watchdog.beat(self.step)
                self.save_checkpoint()
            self.log_checkpoint_records()
            signum = self.stop_requested(signals)
            if signum:
                self.stop_for_signal(signum, saved)

    # Rank of this process (engines set theirs): names its hang report.
    rank = 0

    def stop_requested(self, signals: StopSignals) -> int:
        """The stop signal received (0: none); an engine makes every rank agree on it at the same step."""
        return signals.received or 0

    def stop_for_signal(self, signum: int, saved: bool) -> None:
        """Checkpoint this step (unless just done), wait for it, and stop with how to resume."""
        if not saved:
            self.save_checkpoint()
        self.log_checkpoint_records(wait=True)
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"stopped by {name} at step {self.step} with checkpoint {self.checkpoints_dir / step_dir_name(self.step)}; "
            f"continue with: kmodel train --resume --out {self.run_dir}", signum
        )

    def _log_eval(self, final: bool = False) -> None:
        result = self.evaluate_heldout(self.cfg.train.eval_batches)
        if result is not None:
            self.log({**result, "final": final})

    def _close_wandb(self) -> None:
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None

    def finish(self) -> str:
        """End of run: held-out evaluation (train.eval_batches per file), plots and the summary; returns the summary."""
        from kmodel.train.plots import write_plots
        from kmodel.train.summary import write_summary

        self._log_eval(final=True)
        self._close_wandb()
        write_plots(self.run_dir)
        return write_summary(self.run_dir)
