"""`kmodel launch` and `kmodel plan`: argument parsing; the work is in kmodel.parallel.launch and kmodel.plan."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from kmodel.train.cli import add_init_from_arguments


def add_commands(sub) -> None:
    _add_launch(sub)
    _add_plan(sub)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe key, e.g. --set parallel.zero_stage=3 (repeatable)")


def _add_launch(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="start (or with --dry-run, print) a multi-process / multi-node training run",
        description="Build the command that starts parallel.world_size training processes for RECIPE: locally "
        "(deepspeed --num_gpus N, or torchrun), on several machines through a DeepSpeed hostfile (--hosts or "
        "--hostfile), or as a SLURM batch job (--slurm, rendered from launch/slurm.sbatch). Every rank runs "
        "`python -P -m kmodel.parallel.entry RECIPE --out RUN_DIR --start-or-resume`: the first launch starts the run, "
        "a relaunch resumes it from its latest checkpoint, and a directory whose history has no checkpoint is "
        "refused. Without a GPU the ranks use DeepSpeed's CPU accelerator and gloo (DS_ACCELERATOR=cpu), so a "
        "layout can be rehearsed on any machine with --launcher torchrun.",
    )
    p.add_argument("recipe", help="YAML recipe whose parallel: section sets the world size")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, the rendered sbatch script)")
    p.add_argument("--nodes", type=int, default=1, help="machines to use (default 1)")
    p.add_argument("--gpus-per-node", type=int,
                   help="processes per machine (default parallel.world_size / --nodes); nodes x this must equal world_size")
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed",
                   help="single-machine launcher (default deepspeed)")
    p.add_argument("--hosts", help="comma-separated host names: writes RUN_DIR/hostfile with `host slots=N` lines")
    p.add_argument("--hostfile", help="an existing DeepSpeed hostfile (one `host slots=N` line per machine)")
    p.add_argument("--master-addr", help="rendezvous host for --hosts/--hostfile (default: the first host)")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port (default 29500)")
    p.add_argument("--slurm", action="store_true", help="write RUN_DIR/launch.sbatch and submit it with sbatch")
    p.add_argument("--time", default="48:00:00", help="SLURM time limit per allocation (default 48:00:00; requeued after)")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--cpus-per-task", type=int, default=12, help="SLURM CPU cores per rank (default 12)")
    p.add_argument("--ib-hca", default="mlx5", help="NCCL_IB_HCA: InfiniBand adapters NCCL may use (default mlx5)")
    p.add_argument("--socket-ifname", default="^lo,docker", help="NCCL_SOCKET_IFNAME for bootstrap (default ^lo,docker)")
    p.add_argument("--local-staging", default="/local_scratch/kmodel",
                   help="node-local directory where checkpoints are staged before the copy to RUN_DIR")
    p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="restart a failed run (a crashed rank, or a hung one stopped by train.hang_timeout_s) up to N "
                   "times, each from its newest checkpoint (default 0; SLURM jobs are requeued instead)")
    add_init_from_arguments(p)  # a new stage on the cluster: loaded at the first start, not when requeued
    p.add_argument("--dry-run", action="store_true", help="print what would run (and the sbatch script) without running it")
    _add_overrides(p)
    p.set_defaults(func=_run_launch)


def _run_launch(args) -> int:
    import os

    import torch

    from kmodel.config import load_config
    from kmodel.parallel import launch
    from kmodel.parallel.engine import check_engine
    from kmodel.train.run import check_request, check_resumable, prepare_run, saved_config

    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    launch.validate_options(master_port=args.master_port, cpus_per_task=args.cpus_per_task,
                            gpus_per_node=args.gpus_per_node)
    cfg = load_config(args.recipe, args.overrides)  # refuses layouts the code cannot run (EP vs experts, ...)
    check_engine(cfg)  # and what the trainer would refuse at its first step, before any process starts
    nodes, per_node = launch.layout(cfg, args.nodes, args.gpus_per_node)
    if args.keep_optimizer is not None and args.init_from is None:
        raise ValueError("--keep-optimizer / --reset-optimizer go with --init-from")
    plan = launch.LaunchPlan(nodes, per_node, args.recipe, args.out, list(args.overrides), args.master_port,
                             args.init_from, args.keep_optimizer)
    run_dir = Path(args.out)
    state = launch.run_state(run_dir)  # the ranks' checks, made here before any process starts
    if state == "begin":
        check_resumable(saved_config(run_dir), cfg, run_dir)
    elif state == "resume":  # refuses history without a checkpoint (a lost checkpoints/ folder), among others
        check_request(cfg, run_dir, resume=True, max_steps=None, force=False)
    files: dict[Path, str] = {}
    if args.slurm:
        script = launch.slurm_script(plan, cfg, time_limit=args.time, partition=args.partition, ib_hca=args.ib_hca,
                                     socket_ifname=args.socket_ifname, local_staging=args.local_staging,
                                     cpus_per_task=args.cpus_per_task)
        files[run_dir / "launch.sbatch"] = script
        command = ["sbatch", str(run_dir / "launch.sbatch")]
    elif args.hosts is not None or args.hostfile is not None:
        if args.hosts is not None and args.hostfile is not None:
            raise ValueError("give --hosts or --hostfile, not both")
        if args.hosts is not None:
            hosts = [h.strip() for h in args.hosts.split(",")]
            hostfile = run_dir / "hostfile"
            files[hostfile] = launch.hostfile_text(hosts, per_node)
            if len(hosts) != nodes:
                raise ValueError(f"--hosts names {len(hosts)} machines but --nodes is {nodes}")
        else:
            hostfile = Path(args.hostfile)
            if not hostfile.is_file():
                raise FileNotFoundError(f"--hostfile {hostfile} does not exist")
            hosts = [line.split()[0] for line in hostfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
            if not hosts:
                raise ValueError(f"--hostfile {hostfile} names no machine (one `host slots=N` line per machine)")
        command = launch.hostfile_command(plan, str(hostfile), args.master_addr or hosts[0])
    else:
        if nodes != 1:
            raise ValueError(f"--nodes {nodes} needs --hosts, --hostfile or --slurm")
        command = launch.local_command(plan, args.launcher)
    env = launch.accelerator_env(torch.cuda.is_available())

    if args.dry_run:
        for path, text in files.items():
            print(f"# would write {path}:\n{text}")
        print(" ".join([*(f"{k}={v}" for k, v in env.items()), *(_quote(c) for c in command)]))
        return 0
    if state == "start":  # config.yaml first: the ranks (and a requeued SLURM job) find a prepared run
        prepare_run(cfg, run_dir, resume=False, max_steps=None, force=False)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    return launch.run_with_restarts(command, {**os.environ, **env}, 0 if args.slurm else args.max_restarts)


def _quote(arg: str) -> str:
    return shlex.quote(arg)


def _add_plan(sub) -> None:
    from kmodel.plan import GPUS

    p = sub.add_parser(
        "plan",
        help="say whether a recipe fits a cluster: memory, communication, step time, MFU, days",
        description="Print, per GPU, parameter / gradient / optimizer-state / activation memory, ZeRO and EP "
        "all-to-all, context-parallel and pipeline traffic per step, each pipeline stage and the bubble, estimated "
        "step time and MFU, tokens per day and days to the token budget, "
        "for RECIPE on NODES x GPUS_PER_NODE GPUs (the recipe's parallel.world_size is replaced by that product). "
        "Exits with an error naming what does not fit, and changes that would, when the plan does not fit. "
        "Formulas and assumptions: docs/parallel.md.",
    )
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("--nodes", type=int, required=True, help="machines")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per machine (default 8)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb", help="GPU model (default h100-80gb)")
    p.add_argument("--tokens", type=float,
                   help="token budget for the days estimate (default train.max_steps x tokens per step)")
    p.add_argument("--efficiency", type=float, default=0.45,
                   help="achieved share of peak FLOP/s in the model's kernels (default 0.45)")
    p.add_argument("--zero-overlap", type=float, default=0.5,
                   help="share of ZeRO communication hidden behind compute (default 0.5)")
    p.add_argument("--memory-headroom", type=float, default=0.9,
                   help="usable share of GPU memory after CUDA context and fragmentation (default 0.9)")
    p.add_argument("--search", action="store_true",
                   help="list every layout of the same global batch that fits and the engine runs (pipeline stages "
                   "and schedule, context-parallel size, EP size, ZeRO stage, micro-batch, activation checkpointing, "
                   "optimizer offload), fastest first, each with its --set overrides")
    p.add_argument("--json", action="store_true",
                   help="print the plan as JSON: bytes per GPU by category (params, grads, optimizer, activations, "
                   "as the trainer's memory records name them), communication, step time, MFU")
    _add_overrides(p)
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    import json

    from kmodel.config import ConfigError, load_config
    from kmodel.plan import (GPUS, Assumptions, Cluster, PlanError, check_fits, format_plan, format_search, make_plan,
                             plan_json, search, with_parallel)

    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("efficiency", "zero_overlap", "memory_headroom"):
        value = getattr(args, name)
        if not 0 < value <= 1 and not (name == "zero_overlap" and value == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
    # the cluster sets the world size before the recipe is validated (EP must divide it)
    overrides = [*args.overrides, f"parallel.world_size={args.nodes * args.gpus_per_node}"]
    refused = None
    try:
        cfg = load_config(args.recipe, overrides)
    except ConfigError as error:
        if "zero_stage 3 with expert_parallel_size" not in str(error):
            raise
        refused = error  # ZeRO-3 with EP does not run (docs/parallel.md): plan the alternatives instead
        cfg = load_config(args.recipe, [*overrides, "parallel.zero_stage=1"])
    cluster = Cluster(args.nodes, args.gpus_per_node, GPUS[args.gpu])
    cfg = with_parallel(cfg, cluster.world_size)
    assume = Assumptions.for_config(
        cfg, kernel_efficiency=args.efficiency, zero_overlap=args.zero_overlap, memory_headroom=args.memory_headroom,
    )
    if args.search or refused is not None:
        found = search(cfg, cluster, assume)
        if args.json:
            print(json.dumps([{"set": list(c.overrides), **plan_json(c.plan, c.cfg)} for c in found], indent=2))
        else:
            print(format_search(found, cfg, cluster))
        if refused is not None:
            best = " ".join(f"--set {o}" for o in found[0].overrides) if found else "none fits: add nodes"
            raise PlanError(f"{refused}; the fastest layout that fits on this cluster: {best}")
        return 0 if found else 2
    plan = make_plan(cfg, cluster, assume, args.tokens)
    print(json.dumps(plan_json(plan, cfg), indent=2) if args.json else format_plan(plan, cfg))
    check_fits(plan, cfg)
    if not args.json:
        print("fits: yes")
    return 0
