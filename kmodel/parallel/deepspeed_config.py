"""The DeepSpeed config a recipe implies: every number comes from the recipe's `train:` and `parallel:`.

DeepSpeed checks train_batch_size == micro x accumulation x data-parallel ranks itself; the recipe
validator (`kmodel.config.Config`) already refused inconsistent numbers with the key at fault, so the
dict built here is consistent by construction. Data-parallel ranks are those reading different rows
(`parallel.data_parallel_size`): context-parallel ranks share theirs, and `ReplicaTopology` tells DeepSpeed
so. Expert parallelism is kmodel's own (kmodel.parallel.expert_parallel), so no DeepSpeed MoE section is
generated: ZeRO optimises the dense weights only and the expert shards have their own optimizer
(kmodel.parallel.engine).
"""

from __future__ import annotations

from typing import Any

from kmodel.config import Config


def uses_bf16(cfg: Config, device_type: str) -> bool:
    """train.dtype 'auto' means bf16 on CUDA and fp32 elsewhere, as in single-process training."""
    return cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device_type == "cuda")


def deepspeed_config(cfg: Config, device_type: str = "cuda") -> dict[str, Any]:
    """The `config` argument of deepspeed.initialize for this recipe."""
    t, p = cfg.train, cfg.parallel
    zero: dict[str, Any] = {
        "stage": p.zero_stage,
        "overlap_comm": device_type == "cuda",
        "contiguous_gradients": True,
        "reduce_scatter": True,
    }
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if p.zero_stage == 3:
        # Gather the whole model's weights into one file at save time: checkpoints stay full tensors.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * p.data_parallel_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": uses_bf16(cfg, device_type)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # kmodel builds its own AdamW with dense/expert groups
        "steps_per_print": 10**9,  # kmodel's trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


class ReplicaTopology:
    """DeepSpeed's `mpu` when context-parallel ranks share rows: ZeRO partitions, broadcasts and reduces over the
    `replica` group (DP x CP ranks holding the same dense weights, DeepSpeed's sequence-data-parallel group),
    and its batch arithmetic counts the data-parallel ranks only.

    DeepSpeed divides a reduced gradient by the replica size over its sequence-parallel size (Ulysses' ranks
    each backpropagate a share of the loss). The sequence-parallel size is reported as 1: a kmodel CP rank's
    loss already carries the factor CP (kmodel.parallel.context_parallel), so the plain mean over the replica
    group is the one-process gradient, the mean the expert optimizer takes too."""

    # DeepSpeed tells a sequence-parallel mpu (these groups only) from Megatron's (tensor and pipeline groups)
    # by this attribute; it is never called.
    initialize_sequence_parallel = None

    def __init__(self, replica, data_parallel_size: int, data_parallel_rank: int):
        import torch.distributed as dist

        self.replica, self._dist = replica, dist
        self.data_parallel_size, self.data_parallel_rank = data_parallel_size, data_parallel_rank

    def get_sequence_data_parallel_group(self):
        return self.replica

    def get_sequence_data_parallel_world_size(self) -> int:
        return self._dist.get_world_size(self.replica)

    def get_sequence_data_parallel_rank(self) -> int:
        return self._dist.get_rank(self.replica)

    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_rank
