"""N CPU ranks for a test, two ways. `train_ranks`: `kmodel.parallel.entry` under torchrun, gloo,
DS_ACCELERATOR=cpu, one thread per rank; each launch's whole output is kept beside the run directory
(`<run_dir>.torchrun-<n>.log`), and a failure shows each rank's last lines and, for a rank that died of a signal,
the Python stacks the entry's faulthandler printed. `spawn_ranks`: a test's own function on N spawned processes
joined by a gloo group, failing with every rank's traceback, or naming the ranks that hung."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import subprocess
import time
import traceback
import warnings
from pathlib import Path

from kmodel.safe_path import python_command, safe_env


def torchrun(procs: int, *args: str, log: Path, timeout: int = 600, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -P -m torch.distributed.run --standalone --nproc_per_node procs ARGS`; asserts it succeeded."""
    cmd = python_command("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *args)
    environment = safe_env({**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})})
    done = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    log.write_text(f"$ {' '.join(cmd)}\n--- exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}",
                   encoding="utf-8")
    assert done.returncode == 0, f"torchrun exited {done.returncode} (whole output: {log})\n" + _story(done.stderr)
    return done


def train_ranks(run_dir: Path, recipe: str, procs: int, sets: list[str], resume: bool = False,
                timeout: int = 600) -> subprocess.CompletedProcess:
    """Train RECIPE with `--set` SETS on `procs` ranks into RUN_DIR (`--resume` when asked).

    A fresh run in which a rank died of a fatal signal raised by the C++ runtime (SIGABRT, SIGSEGV: once in CI, a
    gloo rank aborted with "terminate called without an active exception" that no rerun reproduced) is started
    once more in a clean directory, with a warning naming the kept log and the crashed directory; a second crash,
    any Python error and every resumed run fail at once."""
    run_dir = Path(run_dir)
    args = ["-m", "kmodel.parallel.entry", recipe, "--out", str(run_dir), *(["--resume"] if resume else [])]
    for assignment in sets:
        args += ["--set", assignment]
    log = _next_log(run_dir)
    try:
        return torchrun(procs, *args, log=log, timeout=timeout)
    except AssertionError:
        if resume or not _killed_by_fatal_signal(log.read_text(encoding="utf-8")):
            raise
    crashed = run_dir.with_name(f"{run_dir.name}.crashed")
    run_dir.rename(crashed)
    warnings.warn(f"a rank died of a fatal signal; started again once (log {log}, run kept in {crashed})")
    return torchrun(procs, *args, log=_next_log(run_dir), timeout=timeout)


def _next_log(run_dir: Path) -> Path:
    attempt = len(list(run_dir.parent.glob(f"{run_dir.name}.torchrun-*.log"))) + 1
    return run_dir.parent / f"{run_dir.name}.torchrun-{attempt}.log"


def _killed_by_fatal_signal(output: str) -> bool:
    return any(f"Signal {number} ({name}) received" in output for number, name in ((6, "SIGABRT"), (11, "SIGSEGV")))


def _story(stderr: str, keep: int = 6000) -> str:
    """The part of stderr that explains a failure: fatal-signal stacks and tracebacks first, then the tail."""
    lines = stderr.splitlines()
    marks = [i for i, line in enumerate(lines)
             if line.startswith(("Fatal Python error", "Traceback", "terminate called")) or "Error:" in line]
    head = "\n".join(lines[marks[0]:marks[0] + 60]) + "\n...\n" if marks else ""
    return head + stderr[-keep:]


def spawn_ranks(worker, world: int, *args, timeout: float = 240) -> None:
    """worker(rank, world, *args) on `world` spawned processes in one gloo group (a module-level function of the
    test, one thread per rank)."""
    context = multiprocessing.get_context("spawn")
    failures = context.Queue()
    port = _free_port()
    ranks = [context.Process(target=_rank_main, args=(worker, rank, world, port, timeout, failures, args))
             for rank in range(world)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + timeout
    for process in ranks:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(ranks) if process.is_alive()]
    for rank in hung:
        ranks[rank].kill()
    messages = []
    while not failures.empty():
        messages.append(failures.get())
    assert not hung, f"ranks {hung} hung (still running after {timeout:g} s)\n" + "\n".join(messages)
    assert not messages, "\n".join(messages)
    assert all(process.exitcode == 0 for process in ranks), [process.exitcode for process in ranks]


def _rank_main(worker, rank: int, world: int, port: int, timeout: float, failures, args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a collective that waits for a hung rank fails with its traceback before the parent stops waiting
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout / 2))
    try:
        worker(rank, world, *args)
    except BaseException:  # reported to the parent, which fails the test with every rank's message
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
