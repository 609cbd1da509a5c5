"""The Trainer on a DeepSpeed engine: data parallelism with ZeRO 1/2/3, bf16, accumulation, clipping, offload.

    trainer = DeepSpeedTrainer(cfg, run_dir)   # every rank, torch.distributed already initialised
    trainer.restore(checkpoint)                # optional: a full (topology-free) checkpoint, any world size
    trainer.start_engine()                     # deepspeed.initialize; the restored AdamW moments move into ZeRO
    trainer.fit(); trainer.finish()

What changes against the one-process Trainer:
  data       a micro-batch step draws the *global* micro-batch (micro x world rows) from the one seed-ordered
             stream and rank r keeps rows [r*micro, (r+1)*micro). Row j of optimizer step s is the same row
             whatever the world size, so a run resumed with another world size (same global batch) continues
             the same stream; one process with accumulation a*w sees the same micro-batches, in order.
  step       engine.backward (loss / accumulation) then engine.step for every micro-batch; DeepSpeed
             averages gradients over the ranks, clips (train.grad_clip) and applies AdamW at the boundary,
             and skips an update whose gradient norm is not finite. Router loads are summed over the ranks
             before model.end_step, so every rank takes the same aux-loss-free bias step.
  logging    losses are averaged over the ranks; only rank 0 writes metrics, checkpoints, the ledger, plots.
  checkpoint every rank gathers the fp32 master weights and AdamW moments (safe_get_full_*: ZeRO 1/2
             partitions, ZeRO-3 shards), rank 0 writes them in the one-process format: global names, full
             tensors, the AdamW state_dict layout. A checkpoint from any world size restores into any other.

Expert parallelism (parallel.expert_parallel_size > 1) is not wired into the engine yet: it is refused here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kmodel.checkpoint import step_dir_name
from kmodel.config import Config, ConfigError
from kmodel.data import Batch
from kmodel.parallel.deepspeed_config import deepspeed_config, uses_bf16
from kmodel.parallel.expert_parallel import synchronize_router_load
from kmodel.train.trainer import LOSS_KEYS, Trainer

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


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
        if cfg.parallel.expert_parallel_size > 1:
            raise ConfigError("parallel.expert_parallel_size > 1 is not supported by the DeepSpeed trainer yet; use 1")
        super().__init__(cfg, run_dir, **kwargs)
        self.engine = None
        # The one-process AdamW layout (group hyper-parameters, parameter order): checkpoints keep it.
        self._optimizer_groups = [
            ({k: v for k, v in group.items() if k != "params"}, list(group["params"])) for group in self.optimizer.param_groups
        ]

    # --- the engine ----------------------------------------------------------------------------------------
    def start_engine(self) -> None:
        """Wrap model and AdamW in the DeepSpeed engine; AdamW moments restored into the plain optimizer move in."""
        import deepspeed

        restored = {p: dict(s) for p, s in self.optimizer.state.items()}
        config = deepspeed_config(self.cfg, self.device.type)
        if config["bf16"]["enabled"]:
            self.amp_dtype = None  # DeepSpeed keeps bf16 weights (fp32 masters in the optimizer): no autocast
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=config, dist_init_required=False
        )
        if self.cfg.parallel.zero_stage == 3:
            # The LM head weight is read by Model.forward itself (the fused loss takes the weight, not the
            # module), so ZeRO-3 must gather it for the top-level module's forward too.
            deepspeed.zero.register_external_parameter(self.model, self.model.head_weight)
        if restored:
            self._load_moments(restored)

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
        from deepspeed.utils import safe_set_full_optimizer_state

        base = self._base_optimizer()
        step = next(iter(restored.values()))["step"]
        for group in base.param_groups:  # AdamW creates its state lazily: allocate it, then fill the fragments
            for flat in group["params"]:
                base.state[flat] = {"step": step.clone(), **{k: torch.zeros_like(flat) for k in ADAM_MOMENTS}}
        self._link_moments()
        for param, state in restored.items():
            for key in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, state[key].to(self.device), key)

    @property
    def tokens_per_step(self) -> int:
        return super().tokens_per_step * self.world

    # --- one step --------------------------------------------------------------------------------------------
    def next_micro_batch(self) -> Batch:
        micro = self.cfg.train.micro_batch_size
        batch = self.data.next_batch(micro * self.world)  # the global micro-batch, rank after rank
        if self.ledger is not None:
            self.ledger.observe_batch(batch.input_ids)
        rows = slice(self.rank * micro, (self.rank + 1) * micro)
        segments = None if batch.segment_ids is None else batch.segment_ids[rows]
        return Batch(batch.input_ids[rows], batch.labels[rows], segments).to(self.device)

    def forward_backward(self, batch: Batch) -> dict[str, float]:
        """engine.backward scales by 1/accumulation; engine.step between micro-batches only counts them."""
        out = self.engine(batch.input_ids, batch.labels, segment_ids=batch.segment_ids)
        self.engine.backward(out.loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
        keys = [k for k in LOSS_KEYS if getattr(out, k) is not None]
        values = torch.stack([getattr(out, k).detach().float() for k in keys])
        dist.all_reduce(values)
        return dict(zip(keys, (values / self.world).tolist()))

    def update(self, lr: float, losses: dict[str, float]) -> tuple[float, bool]:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # reduce, clip, AdamW (skipped by DeepSpeed when the gradient norm is not finite)
        norm = self.engine.get_global_grad_norm()
        grad_norm = math.nan if norm is None else float(norm)
        applied = self.engine.was_step_applied() and all(math.isfinite(v) for v in losses.values())
        if applied:
            synchronize_router_load(self.model)
            self.model.end_step()
        else:
            self.discard_step()
        return grad_norm, applied

    # --- topology-free state ------------------------------------------------------------------------------------
    def full_weights(self) -> dict[str, torch.Tensor]:
        """fp32 weights under their global names, gathered from ZeRO (collective: every rank calls it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.model.named_parameters())
        weights = {}
        for name, tensor in self.model.state_dict().items():
            full = safe_get_full_fp32_param(params[name]) if name in params else tensor
            weights[name] = full.detach().float().cpu().contiguous()
        return weights

    def optimizer_state(self) -> dict[str, Any]:
        """The one-process AdamW state_dict, moments gathered from ZeRO (collective: every rank calls it)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self._base_optimizer()
        self._link_moments()
        state, groups, index = {}, [], 0
        for hyper, params in self._optimizer_groups:
            live = self.engine.optimizer.param_groups[len(groups)]
            groups.append({**hyper, "lr": live["lr"], "params": list(range(index, index + len(params)))})
            for param in params:
                if base.state:  # nothing before the first step
                    moments = {k: safe_get_full_optimizer_state(param, k).detach().float().cpu() for k in ADAM_MOMENTS}
                    step = next(iter(base.state.values()))["step"]
                    state[index] = {"step": step.detach().cpu().clone(), **moments}
                index += 1
        return {"state": state, "param_groups": groups}

    def save_checkpoint(self) -> Path:
        directory = self.checkpoints_dir / step_dir_name(self.step)
        weights, state = self.full_weights(), self.state_dict()
        if self.rank == 0:
            self.write_checkpoint(directory, weights, state)
        dist.barrier()
        return directory

    # --- rank 0 writes -------------------------------------------------------------------------------------------
    def start_ledger(self, resume: bool) -> None:
        if self.rank == 0:
            super().start_ledger(resume)

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            super().log(record)

    def finish(self) -> str:
        if self.rank == 0:
            return super().finish()
        self._log_eval(final=True)  # evaluation runs on every rank (a ZeRO-3 forward is collective)
        return ""
