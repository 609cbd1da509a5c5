"""One rank of the distributed Muon check (started by test_muon_distributed.py through torch.distributed.run).

    python -P -m torch.distributed.run --nproc_per_node W tests/parallel/muon_ranks.py STAGE OUT

Builds the tiny model, wraps it with kmodel's Muon in deepspeed.initialize at ZeRO stage STAGE (fp32, CPU,
gloo), wires the owner exchange (attach_to_zero), takes STEPS steps, each on this rank's rows of a seeded
global batch, and has rank 0 save the full fp32 weights and Muon momenta after every step to OUT.
"""

import sys

import torch
import torch.distributed as dist

STEPS = 3
OVERRIDES = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64", "model.head_dim=8",
             "model.moe_intermediate_size=16", "model.num_experts=4", "model.vocab_size=64", "data.seq_len=16",
             "train.micro_batch_size=2", "train.optimizer=muon", "train.lr=0.02", "parallel.backend=deepspeed"]


def config(stage: int, world: int):
    from kmodel.config import load_config

    return load_config("recipes/tiny-ko-moe.yaml", OVERRIDES + [f"parallel.zero_stage={stage}", f"parallel.world_size={world}"])


def global_batch(cfg, step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s global batch (world x micro rows): random tokens, labels shifted, the last one ignored."""
    generator = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(cfg.model.vocab_size, (world * cfg.train.micro_batch_size, cfg.data.seq_len), generator=generator)
    labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)
    return ids, labels


def full_state(zero, param: torch.Tensor, key: str | None) -> torch.Tensor:
    """A parameter's fp32 weights (key None) or optimizer state, whole, at any ZeRO stage (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not hasattr(param, "_hp_mapping") and not hasattr(param, "ds_id"):  # stage 0: the parameter itself
        return (param if key is None else zero.state[param][key]).detach().clone()
    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    return value.detach().clone()


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    import deepspeed

    from kmodel.model import build_model
    from kmodel.parallel.deepspeed_config import deepspeed_config
    from kmodel.parallel.muon_zero import attach_to_zero
    from kmodel.train.optim import build_optimizer, uses_muon

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config(stage, world)
    model = build_model(cfg, "cpu")
    optimizer = build_optimizer(model, cfg.train)
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, "cpu"),
                                              dist_init_required=False)
    wired = attach_to_zero(zero, optimizer)
    names = [n for n, p in model.named_parameters()]
    muon_names = [n for n, p in model.named_parameters() if uses_muon(n, p, cfg.train)]
    history = {"wired": wired, "steps": []}
    for step in range(STEPS):
        ids, labels = global_batch(cfg, step, world)
        rows = slice(rank * cfg.train.micro_batch_size, (rank + 1) * cfg.train.micro_batch_size)
        for group in zero.param_groups:
            group["lr"] = cfg.train.lr
        loss = engine(ids[rows], labels[rows]).loss
        engine.backward(loss)
        engine.step()
        params = dict(model.named_parameters())
        weights = {n: full_state(optimizer, params[n], None) for n in names}
        momenta = {n: full_state(optimizer, params[n], "momentum_buffer") for n in muon_names}
        history["steps"].append({"weights": weights, "momenta": momenta})
    if rank == 0:
        torch.save(history, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
