"""Per-rank entry point that `kmodel launch` starts under deepspeed or torchrun:

    python -P -m kmodel.parallel.entry RECIPE --out RUN_DIR [--resume | --start-or-resume] [--force] [--set KEY=VALUE ...]

Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (and LOCAL_RANK) from the launcher, initialises
torch.distributed (nccl on CUDA; gloo and DeepSpeed's CPU accelerator without a GPU), lets rank 0 prepare
the run directory (the others wait and stop with the same error when it fails), then every rank builds the
DeepSpeedTrainer (kmodel.parallel.pipeline's PipelineTrainer when parallel.pipeline_parallel_size > 1), restores
the latest checkpoint when resuming, starts the engine and trains. Rank 0 prints the summary.
`--start-or-resume` (what `kmodel launch` passes) decides by the directory: see kmodel.parallel.launch.run_state.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kmodel.checkpoint import SharedVerification
from kmodel.config import load_config
from kmodel.parallel.engine import DeepSpeedTrainer
from kmodel.parallel.launch import run_state
from kmodel.parallel.pipeline import PipelineTrainer
from kmodel.train.cli import add_init_from_arguments
from kmodel.train.run import RunLock, check_resumable, prepare_run, saved_config, start, write_config
from kmodel.train.watch import TrainingInterrupted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -P -m kmodel.parallel.entry", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="YAML recipe (parallel.backend: deepspeed)")
    p.add_argument("--out", required=True, help="run directory, shared by all ranks")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--start-or-resume", action="store_true",
                   help="start a new run in an empty --out, begin one `kmodel launch` prepared, or resume from the "
                   "latest checkpoint; refuse a directory with history but no checkpoint")
    p.add_argument("--force", action="store_true", help="delete a non-empty --out and start over")
    p.add_argument("--restart", action="store_true",
                   help="with --resume: start over from step 0 although the run has history but no checkpoint "
                   "(the history is kept, as with kmodel train --restart)")
    p.add_argument("--ledger-gap", action="store_true",
                   help="with --resume: continue although ledger.jsonl is missing or broken, recording the gap")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe key (repeatable)")
    add_init_from_arguments(p)  # as kmodel train; ignored when resuming
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = p.parse_args(argv)
    if args.keep_optimizer is not None and args.init_from is None:
        p.error("--keep-optimizer / --reset-optimizer go with --init-from")
    return args


# The collective timeout is the backstop behind the hang watchdog (train.hang_timeout_s): it fires this much
# later, so a stuck rank has dumped every rank's stacks before any collective gives up.
COLLECTIVE_TIMEOUT_MARGIN_S = 300


def init_distributed(hang_timeout_s: float) -> None:
    """Join the process group the launcher describes (nccl and this rank's GPU on CUDA, gloo on CPU), with a
    collective timeout just past the recipe's hang timeout."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"environment {missing} not set: start this module with deepspeed, torchrun or `kmodel launch`")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: its CPU accelerator
    timeout = datetime.timedelta(seconds=hang_timeout_s + COLLECTIVE_TIMEOUT_MARGIN_S)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)


def _prepare(args: argparse.Namespace, run_dir: Path):
    """(config, resume): check and write the run directory as the command line asks."""
    if args.start_or_resume and (args.resume or args.force):
        raise ValueError("--start-or-resume decides by the directory itself; drop --resume / --force")
    cfg = load_config(args.recipe, args.overrides)
    state = run_state(run_dir) if args.start_or_resume else "resume" if args.resume else "start"
    if state == "begin":  # prepared by `kmodel launch`: same recipe, nothing trained yet
        check_resumable(saved_config(run_dir), cfg, run_dir)
        write_config(run_dir, cfg)
        return cfg, False
    resume = state == "resume"
    return prepare_run(cfg, run_dir, resume=resume, max_steps=None, force=args.force, restart=args.restart,
                       ledger_gap=args.ledger_gap), resume


def _prepare_on_rank0(args: argparse.Namespace, run_dir: Path, held: contextlib.ExitStack):
    """Rank 0 locks (for as long as `held`), checks and writes the run directory; its (config, resume) or its
    error is shared with every rank."""
    message = [None]
    if dist.get_rank() == 0:
        try:
            held.enter_context(RunLock(run_dir, create=True))
            message[0] = _prepare(args, run_dir)
        except Exception as error:  # re-raised below on every rank, so no rank waits forever
            message[0] = error
    dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], Exception):
        raise message[0]
    return message[0]


def _every_rank_ok(ok: bool) -> bool:
    """Whether `ok` holds on every rank (collective)."""
    failures = torch.tensor([0 if ok else 1])
    dist.all_reduce(failures)
    return failures.item() == 0


def main(argv: list[str] | None = None) -> int:
    # A rank killed by a fatal signal (an abort inside a C++ collective, a segfault) prints every thread's Python
    # stack to stderr first: the only trace of where one rank of hundreds died.
    faulthandler.enable(all_threads=True)
    args = parse_args(argv)
    init_distributed(load_config(args.recipe, args.overrides).train.hang_timeout_s)
    try:
        run_dir = Path(args.out)
        held = contextlib.ExitStack()
        cfg, resume = _prepare_on_rank0(args, run_dir, held)
        rank0 = dist.get_rank() == 0
        engine = PipelineTrainer if cfg.parallel.pipeline_parallel_size > 1 else DeepSpeedTrainer
        trainer = engine(cfg, run_dir, progress=None if rank0 else False)
        start(trainer, resume, writer=rank0, ledger_gap=args.ledger_gap, init_from=None if resume else args.init_from,
              keep_optimizer=args.keep_optimizer,
              share=SharedVerification(dist.get_rank(), dist.get_world_size(), _every_rank_ok))
        trainer.start_engine()
        with held:
            trainer.fit()
            summary = trainer.finish()
        if rank0:
            print(summary)
    except TrainingInterrupted as stopped:
        if dist.get_rank() == 0:
            print(f"kmodel: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main()  # the rank's work is done: checkpoints written (the writer joined), the process group gone
    # Leave without C++ static destructors. On CPU/gloo one of them (a thread of the communication stack still
    # joinable) now and then aborts a finished rank at exit ("terminate called without an active exception", no
    # Python frame left: seen twice in CI), and torchrun then fails the whole job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
