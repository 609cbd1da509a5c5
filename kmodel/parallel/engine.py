"""The Trainer on a DeepSpeed engine: data parallelism with ZeRO 1/2/3, bf16, accumulation, clipping, offload.

    trainer = DeepSpeedTrainer(cfg, run_dir)   # every rank, torch.distributed already initialised
    trainer.restore(checkpoint)                # optional: a full (topology-free) checkpoint, any world size
    trainer.start_engine()                     # deepspeed.initialize; the restored AdamW moments move into ZeRO
    trainer.fit(); trainer.finish()

What changes against the one-process Trainer:
  data       a micro-batch step draws the *global* micro-batch (micro x world rows) from the one seed-ordered
             order and rank r reads only rows [r*micro, (r+1)*micro) through the memory-mapped shards (the
             rank writing the ledger reads them all, to digest them). Row j of optimizer step s is the same row
             whatever the world size, so a run resumed with another world size (same global batch) continues
             the same stream; one process with accumulation a*w sees the same micro-batches, in order.
  step       engine.backward (loss / accumulation) then engine.step for every micro-batch; DeepSpeed
             averages gradients over the ranks, clips (train.grad_clip) and applies AdamW at the boundary,
             and skips an update whose gradient norm is not finite. Router loads are summed over the ranks
             before model.end_step, so every rank takes the same aux-loss-free bias step.
  logging    losses are averaged over the ranks; only rank 0 writes metrics, the ledger, plots.
  checkpoint every rank writes what it holds, nothing gathered: its pieces of the fp32 master weights and
             AdamW moments (ZeRO-1/2 fragments of the flat partitions, ZeRO-3 partitions, expert pieces)
             under global names and element ranges (`owned_weights`, `owned_moments`), in the background;
             rank 0 commits (kmodel.checkpoint.sharded). A restore reads, per rank, only the elements of
             its own partitions, so a checkpoint from any world size, EP size or ZeRO stage restores into
             any other.

Expert parallelism (parallel.expert_parallel_size P > 1, ZeRO-1/2): every rank builds only its E/P routed
experts per MoE layer (nothing bigger is allocated) and its MoE layers exchange tokens by all-to-all
(kmodel.parallel.expert_parallel). DeepSpeed gets the dense parameters only; the expert shards have their
own AdamW (ExpertOptimizer: fp32 masters, reduced gradients and moments sharded over the expert-data-parallel
group as ZeRO-1/2 shard the dense ones: gradients reduce-scattered, the owned piece updated, weights
all-gathered). Clipping
stays joint: ZeRO's global-norm computation is extended with the experts' share, so DeepSpeed clips (or
skips, when non-finite) with the norm of all parameters and the experts are scaled by the same factor.
Checkpoints hold each rank's expert pieces under global element ranges, so they resume on any EP size.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kmodel.checkpoint import CheckpointError, LazyTensor, load_weights_into, sharded
from kmodel.checkpoint.index import PieceSpec
from kmodel.checkpoint.writer import snapshot
from kmodel.config import Config, ConfigError
from kmodel.data import Batch
from kmodel.hashing import sorted_weights_sha256
from kmodel.parallel import context_parallel as cp
from kmodel.parallel.deepspeed_config import ReplicaTopology, deepspeed_config
from kmodel.parallel.mesh import Mesh, build_groups
from kmodel.model import build_model
from kmodel.parallel import expert_parallel as xp
from kmodel.rundir import step_dir_name
from kmodel.train.memory import SavedActivations, record_key, tensors_bytes
from kmodel.parallel.muon_zero import attach_to_zero, expert_muon, scale_master_rows
from kmodel.train.muon import Muon
from kmodel.train.optim import optimizer_for, param_groups, state_keys
from kmodel.train.trainer import LOSS_KEYS, Trainer
from kmodel.train.watch import InsufficientSpace

DEEPSPEED_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce and all-gather buckets


def check_engine(cfg: Config) -> None:
    """What the DeepSpeed trainer refuses before it trains a step (the entry's ranks, `kmodel launch`, the planner),
    with the key and a fix."""
    if cfg.parallel.zero_stage == 0:
        raise ConfigError(
            "parallel.zero_stage 0 with parallel.backend deepspeed: every rank saves its share of ZeRO's partitions, "
            "which stage 0 does not have; set parallel.zero_stage=1 (the same update and losses, the optimizer state "
            "sharded over the data-parallel ranks)"
        )
    cp.check_supported(cfg)


def joint_norm(dense: torch.Tensor | float, experts: torch.Tensor) -> torch.Tensor:
    """sqrt(dense^2 + experts^2); inf when either is invalid (DeepSpeed marks an invalid norm as -1 or
    non-finite), so ZeRO treats the step as an overflow and skips it."""
    dense = torch.as_tensor(dense, dtype=torch.float32, device=experts.device)
    if not (torch.isfinite(dense) and dense >= 0 and torch.isfinite(experts)):
        return torch.tensor(float("inf"), device=experts.device)
    return torch.sqrt(dense.square() + experts.float().square())


def _read_range(value: torch.Tensor | LazyTensor, span: tuple[int, int]) -> torch.Tensor:
    """Elements [begin, end) of a flattened checkpoint tensor, reading only the pieces that hold them."""
    if isinstance(value, LazyTensor):
        return value.load_flat(*span)
    return value.reshape(-1)[span[0]:span[1]]


def clip_factor(total_norm: float, clip: float) -> float:
    """The divisor ZeRO applies to the gradients for train.grad_clip (same formula, so experts match)."""
    if clip <= 0:
        return 1.0
    return max((total_norm + 1e-6) / clip, 1.0)


class DeepSpeedTrainer(Trainer):
    def __init__(self, cfg: Config, run_dir: str | Path, **kwargs):
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedTrainer needs torch.distributed initialised (run it through kmodel.parallel.entry)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cfg.parallel.backend != "deepspeed":
            raise ConfigError(f"parallel.backend is {cfg.parallel.backend!r}; the DeepSpeed trainer needs 'deepspeed'")
        if self.world != cfg.parallel.world_size:
            raise ConfigError(
                f"parallel.world_size is {cfg.parallel.world_size} but {self.world} processes were started; "
                f"set --set parallel.world_size={self.world} (and keep micro_batch_size x grad_accum_steps x world_size)"
            )
        check_engine(cfg)
        self.mesh = Mesh.from_config(cfg.parallel)
        self.coords = self.mesh.coords(self.rank)
        # Context (or pipeline) parallelism: every group from the mesh, once; otherwise only what EP needs.
        self.process_groups = build_groups(self.mesh, self.rank) if self.mesh.world > self.mesh.data else None
        ep = cfg.parallel.expert_parallel_size
        self.groups = xp.make_groups(ep, self.process_groups) if ep > 1 else None
        self.context: cp.ContextParallel | None = None  # set by make_model when context_parallel_size > 1
        super().__init__(cfg, run_dir, **kwargs)
        self.engine = None
        self.experts: xp.ExpertOptimizer | None = None
        self._restored: dict[torch.nn.Parameter, dict[str, Any]] = {}  # AdamW entries from `restore`
        # measured over this process's first step (None once logged): saved activations and held gradients
        self._activations_peak: int | None = 0
        self._grads_peak = 0
        # The one-process AdamW layout (group hyper-parameters, parameter order): checkpoints keep it.
        self._optimizer_groups = [
            ({k: v for k, v in group.items() if k != "params"}, list(group["params"])) for group in self.optimizer.param_groups
        ]
        self._optimizer_params = [p for _, group in self._optimizer_groups for p in group]  # index -> parameter

    def make_model(self) -> torch.nn.Module:
        experts = None if self.groups is None else xp.local_experts(self.cfg.model.num_experts, self.groups)
        model = build_model(self.cfg, self.device, experts=experts, keep=self.keep_modules)
        if self.groups is not None:
            xp.attach_expert_parallel(model, self.groups)
        if self.cfg.model.aux_loss_kind == "global":
            xp.attach_global_balance(model, self._replica_group)
        if self.mesh.context > 1:
            self.context = cp.ContextParallel(self.cfg.data.seq_len, self.process_groups["context"])
            self.context.attach(model)
            if self.cfg.model.aux_loss_kind != "global":  # a sequence's expert counts span its CP ranks
                xp.attach_global_balance(model, self.process_groups["context"])
            if self.rank == 0:
                for layer, window in cp.gathered_windows(self.cfg):
                    print(f"note: layer {layer}'s sliding window {window} reaches past the previous context-parallel "
                          f"chunk of {self.context.layout.chunk_len} tokens (data.seq_len {self.cfg.data.seq_len} / "
                          f"(2 x context_parallel_size {self.mesh.context})): it gathers keys and values like a "
                          "global layer (exact, more bytes)", file=sys.stderr)
        return model

    def keep_modules(self, model: torch.nn.Module) -> None:
        """Drop from the meta model what this rank does not hold (besides other ranks' experts): nothing here; a
        pipeline stage drops the other stages' layers (kmodel.parallel.pipeline)."""

    @functools.cached_property
    def eval_model(self) -> torch.nn.Module:
        """Under context parallelism each rank evaluates its chunks of the held-out rows."""
        return self.model if self.context is None else cp.SplitEvaluation(self.model, self.context)

    @property
    def _replica_group(self):
        """The ranks holding the same dense weights (None: the whole world)."""
        return None if self.process_groups is None else self.process_groups["replica"]

    def is_expert(self, param: torch.nn.Parameter) -> bool:
        return self.experts is not None and param in self.experts

    # --- the engine ----------------------------------------------------------------------------------------
    def start_engine(self) -> None:
        """Wrap model and AdamW in the DeepSpeed engine; AdamW moments restored into the plain optimizer move in
        (under expert parallelism the expert shards' moments go to the ExpertOptimizer instead)."""
        import deepspeed

        restored, self._restored = self._restored, {}
        config = self.engine_config()
        if config["bf16"]["enabled"]:
            self.amp_dtype = None  # DeepSpeed keeps bf16 weights (fp32 masters in the optimizer): no autocast
        if self.groups is not None:
            self.experts = xp.ExpertOptimizer(self.model, self.groups, self.cfg.train, zero_stage=self.cfg.parallel.zero_stage)
            if self.cfg.train.optimizer == "muon":  # the same rule on the expert shards (no state yet to carry over)
                self.experts.optimizer = expert_muon(self.experts, self.cfg.train)
        optimizer = self._engine_optimizer()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=config, dist_init_required=False, mpu=self.topology()
        )
        if isinstance(optimizer, Muon):  # ZeRO flattened the matrices: Newton-Schulz on whole ones, at owners
            attach_to_zero(self.engine.optimizer, optimizer)
        if self.cfg.parallel.zero_stage == 3:
            # The LM head weight is read by Model.forward itself (the fused loss takes the weight, not the
            # module), so ZeRO-3 must gather it for the top-level module's forward too.
            deepspeed.zero.register_external_parameter(self.model, self.model.head_weight)
        if self.experts is not None:
            self.experts.write_back()  # DeepSpeed's start-up broadcast overwrote every shard with rank 0's
            self._add_expert_norm_to_zero()
            for param in [p for p in restored if self.is_expert(p)]:
                entry = restored.pop(param)
                span = self.experts.owned_range(param)
                self.experts.load_state(param, entry["step"], {k: _read_range(v, span) for k, v in entry.items() if k != "step"})
        if restored:
            self._load_moments(restored)
        self._load_masters()

    def engine_config(self) -> dict[str, Any]:
        """deepspeed.initialize's config (a pipeline engine accumulates inside its schedule). ZeRO's reduce and
        all-gather buckets hold at most the weights ZeRO optimises here (all but the expert shards under expert
        parallelism): DeepSpeed's default, 5e8 elements, is 2 GB of fp32 allocated however small the model (CPU
        ranks of the test suite were OOM-killed)."""
        config = deepspeed_config(self.cfg, self.device.type)
        zero_held = sum(p.numel() for name, p in self.model.named_parameters()
                        if self.groups is None or not xp.is_expert_param(name))
        for bucket in ("reduce_bucket_size", "allgather_bucket_size"):
            config["zero_optimization"][bucket] = min(zero_held, DEEPSPEED_BUCKET_ELEMENTS)
        return config

    def topology(self):
        """DeepSpeed's `mpu`: which groups ZeRO partitions, reduces and takes norms over (None: the world)."""
        return None if self.context is None else ReplicaTopology(self._replica_group, self.mesh.data, self.coords.data)

    def _engine_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over what DeepSpeed optimises (every parameter but the expert shards). With optimizer offload
        the update runs on the CPU: DeepSpeed's vectorised CPU Adam in AdamW mode (ZeRO-Offload refuses a
        plain torch optimizer there), same groups and hyper-parameters."""
        train = self.cfg.train
        named = [(n, p) for n, p in self.model.named_parameters() if not self.is_expert(p)]
        if not self.cfg.parallel.offload_optimizer:
            return optimizer_for(named, train)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups(named, train), lr=train.lr, betas=(train.beta1, train.beta2),
                                eps=train.adam_eps, adamw_mode=True)

    def _add_expert_norm_to_zero(self) -> None:
        """Make ZeRO-1/2's global gradient norm the norm of dense and expert gradients together, so its clipping
        and its non-finite check cover the experts (set per step by `update`)."""
        zero = self.engine.optimizer
        if not hasattr(zero, "scaled_global_norm"):
            raise RuntimeError(
                f"expert parallelism extends DeepSpeed ZeRO-1/2's scaled_global_norm, which {type(zero).__name__} "
                "does not have (DeepSpeed version change?)"
            )
        if getattr(zero, "loss_scale", 1.0) != 1.0:
            raise RuntimeError("expert parallelism assumes no loss scaling (bf16 or fp32, not fp16)")
        dense_norm = zero.scaled_global_norm
        zero.scaled_global_norm = lambda *args, **kwargs: joint_norm(dense_norm(*args, **kwargs), self._expert_norm)

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer.optimizer  # the AdamW over ZeRO's flat fp32 partitions

    def _link_moments(self) -> None:
        """ZeRO-1/2 link each parameter to its slice of the AdamW moments once, after the first group's first
        step, before the other groups have state (DeepSpeed 0.19): link again now that every group has state."""
        zero = self.engine.optimizer
        if hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _load_moments(self, restored: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        base, zero = self._base_optimizer(), self.engine.optimizer
        step = next(iter(restored.values()))["step"]
        # Adam creates its state lazily: allocate it for ZeRO's flat fp32 partitions, then fill the fragments.
        # ZeRO-3 keys the state by its (sub-)group flats, ZeRO-1/2 by one flat partition per group.
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        sub_groups = getattr(zero, "sub_group_to_group_id", None)  # ZeRO-3: flat i is a sub-group of a group
        for index, flat in enumerate(flats):
            group = index if sub_groups is None else sub_groups[index]
            # torch's AdamW (and Muon) count steps in a float tensor, DeepSpeed's CPU Adam in a Python int
            count = step.clone() if isinstance(base, torch.optim.AdamW | Muon) else int(step)
            keys = state_keys(base.param_groups[group])  # AdamW's moments, or Muon's momentum
            base.state[flat] = {"step": count, **{k: torch.zeros_like(flat) for k in keys}}
        self._link_moments()
        for param, state in restored.items():  # each rank reads the elements of its own partition only
            span = self._owned_range(param)
            if span is None or span[1] <= span[0]:
                continue
            for key in (k for k in state if k != "step"):
                self._place_owned(param, key, _read_range(state[key], span))

    @torch.no_grad()  # the fp32 masters are leaves that require grad
    def _place_owned(self, param: torch.nn.Parameter, key: str | None, value: torch.Tensor) -> None:
        """This rank's piece (the elements in `_owned_range`) of a dense parameter's fp32 master (`key` None) or
        optimizer state."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        if hasattr(param, "ds_tensor"):  # ZeRO-3 takes its whole, padded partition
            padded = torch.nn.functional.pad(value.float(), (0, param.ds_tensor.ds_numel - value.numel())).to(self.device)
            if key is None:
                safe_set_local_fp32_param(param, padded)
            else:
                safe_set_local_optimizer_state(param, padded, key)
        else:
            param._hp_mapping.get_hp_fragment(key).copy_(value)

    def scale_rows(self, scales: dict[str, torch.Tensor]) -> None:
        """MuonClip's rescale on ZeRO's fp32 masters and the module weights (collective)."""
        scale_master_rows(self.engine.optimizer, self.model, scales)

    @property
    def tokens_per_step(self) -> int:
        return super().tokens_per_step * self.mesh.data

    # --- one step --------------------------------------------------------------------------------------------
    def next_micro_batch(self) -> Batch:
        micro, dp = self.cfg.train.micro_batch_size, self.mesh.data
        # the data-parallel rank picks the rows: a sequence's context-parallel ranks read the same ones
        rows = slice(self.coords.data * micro, (self.coords.data + 1) * micro)
        if self.ledger is None:  # a rank reads only its rows of the global micro-batch
            return self.data.next_batch(micro * dp, keep=rows).to(self.device)
        batch = self.data.next_batch(micro * dp)  # the ledger digests the whole global micro-batch
        self.ledger.observe_batch(batch.input_ids)
        segments = None if batch.segment_ids is None else batch.segment_ids[rows]
        return Batch(batch.input_ids[rows], batch.labels[rows], segments).to(self.device)

    def forward_backward(self, batch: Batch) -> dict[str, float]:
        """engine.backward scales by 1/accumulation; engine.step between micro-batches only counts them."""
        meter = SavedActivations() if self._activations_peak is not None else contextlib.nullcontext()
        with meter:
            if self.context is None:
                out = self.engine(batch.input_ids, batch.labels, segment_ids=batch.segment_ids)
                self.engine.backward(out.loss)
                terms = {k: getattr(out, k) for k in LOSS_KEYS if getattr(out, k) is not None}
            else:  # this rank's chunks; each term CP x its share, so the mean over the ranks is the sequence's
                terms = self.context.run(batch, self.engine, self.engine.backward)
        if self.context is not None and self._activations_peak is not None and self.engine.is_gradient_accumulation_boundary():
            self._log_context_bytes()  # once: the first step's last micro-batch
        if self.experts is not None:
            self.experts.reduce_micro_batch(self.engine.is_gradient_accumulation_boundary())
        if self._activations_peak is not None:
            self._activations_peak = max(self._activations_peak, meter.peak_bytes)
            self._grads_peak = max(self._grads_peak, self._grads_bytes())
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
        values = torch.stack([v.detach().float() for v in terms.values()])
        dist.all_reduce(values)
        return dict(zip(terms, (values / self.world).tolist()))

    def _log_context_bytes(self) -> None:
        """Once, at the first step's last micro-batch: the bytes each rank's attention layers received in its
        forward, by layer kind, with the layout that determines them (collective; rank 0 writes every rank's record)."""
        layout = self.context.layout
        record = {"kind": "context_parallel", "step": self.step + 1, "rank": self.rank, "cp_rank": layout.rank,
                  "cp_size": layout.size, "seq_len": layout.seq_len, "chunk_len": layout.chunk_len,
                  "received_bytes": self.context.forward_bytes}
        records = [None] * self.world
        dist.all_gather_object(records, record)
        for r in records:
            self.log(r)

    def update(self, lr: float, losses: dict[str, float]) -> tuple[float, bool]:
        if self.experts is not None:
            self._expert_norm = self.experts.reduce_gradients()  # read by ZeRO's norm inside engine.step
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # reduce, clip, AdamW (skipped by DeepSpeed when the gradient norm is not finite)
        norm = self.engine.get_global_grad_norm()
        grad_norm = math.nan if norm is None else float(norm)
        applied = self.engine.was_step_applied() and all(math.isfinite(v) for v in losses.values())
        if self.experts is not None:
            if applied:
                self.experts.step(lr, clip_factor(grad_norm, self.cfg.train.grad_clip))
            self.experts.zero_grad()
        if self._activations_peak is not None:  # after the first update, which allocates the optimizer states
            self._log_memory()
        if applied:
            self.clip_attention_logits()
            xp.synchronize_router_load(self.model, self._replica_group)
            self.model.end_step()
        else:
            self.discard_step()
        return grad_norm, applied

    # --- memory: what each rank holds, by category (kmodel.train.memory), logged once -----------------------
    def _dense_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if not self.is_expert(p)]

    def _grads_bytes(self) -> int:
        """Gradients held after a micro-batch's backward: the module's (ZeRO-1 accumulates full gradients between
        micro-batches and reduces at the step's last one) and ZeRO's partitions (ZeRO-1/2: the reduced partition;
        ZeRO-3: its flat buffer of partitions), plus the experts' owned reduced gradients."""
        zero = self.engine.optimizer
        held = [p.grad for p in self._dense_params()]
        flat = getattr(zero, "grad_partitions_flat_buffer", None)
        if flat is not None:  # ZeRO-3: every partition is a view of this buffer
            held.append(flat)
        else:
            for value in getattr(zero, "averaged_gradients", {}).values():
                held += value if isinstance(value, list) else [value]
        experts = self.experts.held_bytes()["grads"] if self.experts is not None else 0
        return tensors_bytes(held) + experts

    def _params_and_optimizer_bytes(self) -> tuple[int, int]:
        """Weights (ZeRO-3: this rank's partitions) and fp32 masters + optimizer moments (ZeRO's partitions)."""
        zero, base = self.engine.optimizer, self._base_optimizer()
        params = tensors_bytes(getattr(p, "ds_tensor", p) for p in self._dense_params())
        masters = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        moments = [t for state in base.state.values() for t in state.values() if isinstance(t, torch.Tensor) and t.ndim]
        optimizer = tensors_bytes([*masters, *moments])
        if self.experts is not None:
            held = self.experts.held_bytes()
            params, optimizer = params + held["params"], optimizer + held["optimizer"]
        return params, optimizer

    def _log_memory(self) -> None:
        """After the first step: every rank's record (collective), written by rank 0 in rank order."""
        params, optimizer = self._params_and_optimizer_bytes()
        values = {"params": params, "grads": self._grads_peak, "optimizer": optimizer, "activations": self._activations_peak}
        record = {"kind": "memory", "step": self.step + 1, "rank": self.rank,
                  **{record_key(k): int(v) for k, v in values.items()}}
        if self.device.type == "cuda":
            record["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        records = [None] * self.world
        dist.all_gather_object(records, record)
        for r in records:
            self.log(r)
        self._activations_peak = None

    # --- topology-free state: streamed out, read back one tensor at a time -----------------------------------
    @functools.cached_property
    def _full_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Dtype and full (unsharded, unpartitioned) shape of every state_dict entry, from a meta-device model."""
        with torch.device("meta"):
            state = type(self.model)(self.cfg.model).state_dict()
        return {name: (t.dtype, tuple(t.shape)) for name, t in state.items()}

    def _owned_range(self, param: torch.nn.Parameter) -> tuple[int, int] | None:
        """Elements [begin, end) of the flattened global parameter whose fp32 master and moments this rank holds
        (None: none): its ZeRO-1/2 fragment of the flat partition, its ZeRO-3 partition, or its expert
        optimizer piece."""
        if self.is_expert(param):
            return self.experts.owned_range(param)
        if hasattr(param, "ds_tensor"):  # ZeRO-3: rank r holds elements [r * size, (r + 1) * size), padded
            size = param.ds_tensor.ds_numel
            begin = dist.get_rank(group=param.ds_process_group) * size
            return (begin, min(begin + size, param.ds_numel)) if begin < param.ds_numel else None
        fragment = param._hp_mapping  # ZeRO-1/2 (None: this rank's partition holds nothing of it)
        if fragment is None:
            return None
        address = fragment.lp_fragment_address
        return address.start, address.start + address.numel

    def _owned_value(self, param: torch.nn.Parameter, key: str | None, count: int) -> torch.Tensor:
        """This rank's fp32 master (`key` None) or optimizer-state piece of `param`, without a collective
        (DeepSpeed's per-rank partition accessors): a view of the training state (ZeRO-3 hands a copy when it
        keeps the partition on another device)."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        if self.is_expert(param):
            return self.experts.owned(param, key)
        if hasattr(param, "ds_tensor"):
            local = safe_get_local_fp32_param(param) if key is None else safe_get_local_optimizer_state(param, key)
            return local.reshape(-1)[:count]
        return param._hp_mapping.get_hp_fragment(key)

    def _owned_pieces(self, names: list[tuple[str, torch.nn.Parameter, str | None]]) -> list[tuple[PieceSpec, torch.Tensor]]:
        """(stored name, parameter, state key) -> the pieces of them this rank holds, fp32, global shapes."""
        specs, owned = self._full_specs, []
        parameter_names = {p: n for n, p in self.model.named_parameters()}
        for stored, param, key in names:
            span = self._owned_range(param)
            if span is not None and span[1] > span[0]:
                shape = specs[parameter_names[param]][1]
                owned.append((PieceSpec(stored, torch.float32, shape, *span),
                              self._owned_value(param, key, span[1] - span[0]).detach().float()))
        return owned

    def owned_weights(self) -> list[tuple[PieceSpec, torch.Tensor]]:
        """The weights this rank holds, as pieces of the global tensors (name, global shape, element range): the
        fp32 masters of its ZeRO partitions and expert pieces, and the buffers (the same on every rank) spread
        over the ranks by bytes. Views of the training state, found without any collective."""
        params, state = dict(self.model.named_parameters()), self.model.state_dict()
        buffers = sorted((n, *self._full_specs[n]) for n in state if n not in params)
        # the ranks holding these buffers: this rank's replica group (its pipeline stage; the world without one)
        owners = sharded.balanced_owners(buffers, dist.get_world_size(self._replica_group))
        mine = [(PieceSpec(n, dtype, shape, 0, math.prod(shape)), state[n].detach())
                for n, dtype, shape in buffers if owners[n] == dist.get_rank(self._replica_group)]
        return sorted(mine + self._owned_pieces([(n, p, None) for n, p in params.items()]), key=lambda o: o[0].name)

    def owned_moments(self) -> list[tuple[PieceSpec, torch.Tensor]] | None:
        """The optimizer's moments this rank holds, named as optimizer.safetensors names them (`state.<index>.<key>`,
        the one-process parameter order), as pieces like `owned_weights`; None before the first step."""
        if not self._base_optimizer().state:
            return None
        self._link_moments()
        keys = {param: state_keys(hyper) for hyper, params in self._optimizer_groups for param in params}
        return self._owned_pieces(sorted((f"state.{i}.{key}", param, key) for i, param in enumerate(self._optimizer_params)
                                         for key in keys[param]))

    def optimizer_layout(self) -> list[list[int]]:
        sizes = [len(params) for _, params in self._optimizer_groups]
        return [list(range(sum(sizes[:i]), sum(sizes[:i + 1]))) for i in range(len(sizes))]

    def optimizer_state(self) -> dict[str, Any]:
        """The one-process AdamW state_dict without its moments (those are written as `owned_moments`)."""
        base = self._base_optimizer()
        # saved as torch's AdamW keeps it (a float tensor), whichever Adam ran
        step = torch.tensor(float(next(iter(base.state.values()))["step"])) if base.state else None
        state, groups, index = {}, [], 0
        for hyper, params in self._optimizer_groups:
            live = self.engine.optimizer.param_groups[len(groups)]
            groups.append({**hyper, "lr": live["lr"], "params": list(range(index, index + len(params)))})
            for _ in params:
                if step is not None:
                    state[index] = {"step": step.clone()}
                index += 1
        return {"state": state, "param_groups": groups}

    def save_checkpoint(self) -> Path:
        """Every rank copies the pieces it holds (its ZeRO partitions and expert pieces, found locally: nothing
        is gathered); then, on the checkpoint writer (a background thread with train.async_checkpoint),
        writes them as its shards, and rank 0 commits the checkpoint, records it and rotates
        (kmodel.checkpoint.sharded)."""
        started = time.perf_counter()
        self.checkpoint_writer.wait()
        self.make_room_for_checkpoint()
        directory = self.checkpoints_dir / step_dir_name(self.step)
        state = snapshot(self.state_dict())
        if self.rank == 0:
            sharded.prepare(directory)
        dist.barrier()
        # a background write needs a copy (training goes on changing the partitions); a synchronous one writes
        # straight from them, one piece at a time
        copy = snapshot if self.checkpoint_writer.asynchronous else torch.Tensor.detach
        streams = {kind: sharded.ShardStream([piece for piece, _ in owned], [copy(value) for _, value in owned])
                   for kind, owned in (("model", self.owned_weights()), ("optimizer", self.owned_moments()))
                   if owned is not None}
        tmp, rank, world = sharded.tmp_dir(directory), self.rank, self.world

        def write() -> int:
            written = sum(r.bytes for r in sharded.write_rank(tmp, rank, world, streams).values())
            if rank == 0:
                manifest = sharded.commit_sharded(tmp, directory, world, self.cfg, state=state, tokenizer=self.tokenizer)
                written = sum(r.bytes for r in manifest.files.values())
            return written

        if self.rank == 0:
            self.submit_checkpoint(directory, started, write)
        else:
            self.checkpoint_writer.submit(self.step, started, write)
        if not self.checkpoint_writer.asynchronous:
            dist.barrier()
        return directory

    lazy_restore = True

    def _expert_rows(self) -> slice | None:
        if self.groups is None:
            return None
        first, count = xp.local_experts(self.cfg.model.num_experts, self.groups)
        return slice(first, first + count)

    def load_weights(self, weights: Mapping[str, torch.Tensor | LazyTensor], source: str) -> None:
        """Each tensor read on its own; an expert-parallel rank reads only its experts' rows. The weights are kept
        (unread) for `start_engine`, which puts this rank's elements of them into ZeRO's fp32 masters."""
        rows = self._expert_rows()
        load_weights_into(self.model, weights, source, None if rows is None else
                          (lambda name: rows if xp.is_expert_param(name) else None))
        self._restored_weights = weights

    _restored_weights: Mapping[str, torch.Tensor | LazyTensor] | None = None

    def _load_masters(self) -> None:
        """The restored weights' elements this rank owns into ZeRO's fp32 masters: DeepSpeed builds them from the
        module's weights, which under bf16 are the checkpoint's rounded. (The expert optimizer takes its masters
        from the module before DeepSpeed casts it.)"""
        weights, self._restored_weights = self._restored_weights, None
        if weights is None:
            return
        for name, param in self.model.named_parameters():
            span = None if self.is_expert(param) else self._owned_range(param)
            if span is not None and span[1] > span[0]:
                self._place_owned(param, None, _read_range(weights[name], span))

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Keep the checkpoint's AdamW entries (moments unread) for `start_engine`, which places them one
        tensor at a time into ZeRO's partitions and the expert optimizer."""
        params = self._optimizer_params
        unknown = [i for i in state["state"] if not 0 <= int(i) < len(params)]
        if unknown:
            raise CheckpointError(f"the checkpoint's optimizer has entries {unknown[:5]} for a model with {len(params)} parameters")
        self._restored = {params[int(i)]: entry for i, entry in state["state"].items()}

    # --- rank 0 writes -------------------------------------------------------------------------------------------
    def start_ledger(self, resume: bool) -> None:
        init_hash = None
        if self.groups is not None and self.cfg.provenance.ledger and not self.ledger_exists(resume):
            # The genesis hash covers the full initial model: expert tensors are gathered one at a time, in
            # name order, and hashed on rank 0 as they arrive (collective).
            tensors = xp.full_state_items(self.model, self.groups)
            if self.rank == 0:
                init_hash = sorted_weights_sha256(tensors)
            else:
                collections.deque(tensors, maxlen=0)
        if self.rank == 0:
            super().start_ledger(resume, init_hash)

    def make_room_for_checkpoint(self) -> None:
        """Rank 0 checks the free space (rotating old checkpoints first); every rank stops with its verdict."""
        verdict = [None]
        if self.rank == 0:
            try:
                super().make_room_for_checkpoint()
            except InsufficientSpace as error:
                verdict[0] = str(error)
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise InsufficientSpace(verdict[0])

    def stop_requested(self, signals) -> int:
        """A stop signal seen by any rank stops every rank after the same step (one small all-reduce per step),
        so their checkpoint collectives line up."""
        received = torch.tensor([signals.received or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return int(received.item())

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            super().log(record)

    def finish(self) -> str:
        if self.rank == 0:
            return super().finish()
        self._log_eval(final=True)  # evaluation runs on every rank (a ZeRO-3 forward is collective)
        return ""
