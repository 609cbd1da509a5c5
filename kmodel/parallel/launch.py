"""Launch commands for a recipe: local multi-process, multi-node with a DeepSpeed hostfile, or SLURM.

Every rank runs `python -P -m kmodel.parallel.entry RECIPE --out RUN_DIR --start-or-resume`; the launchers
only differ in how they start those processes. `run_state` decides what such a rank does with RUN_DIR: start a
new run (absent or empty directory), begin one `kmodel launch` prepared (config.yaml, no history yet), or
resume from the latest checkpoint; a directory with history but no checkpoint is refused (by the resume's
checks in kmodel.train.run), since starting over would overwrite that history. Each launcher runs under
`env PYTHONSAFEPATH=1` (kmodel.safe_path), so no rank started from the repository root imports our folders in
place of installed packages. The recipe's `parallel.world_size` is the number of ranks, so nodes x GPUs per
node must equal it. The SLURM script is rendered from the readable template launch/slurm.sbatch ({{name}}
placeholders).
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kmodel.checkpoint import list_checkpoints
from kmodel.config import Config
from kmodel.rundir import RunDir
from kmodel.train.run import never_started
from kmodel.safe_path import SAFE_PATH_ENV

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "launch"
ENTRY_MODULE = "kmodel.parallel.entry"
# Prefix of every launcher command: torchrun and DeepSpeed start the ranks with `python -m` themselves, and
# DeepSpeed's multi-node runner forwards PYTHON* variables to the other nodes.
SAFE_ENV_PREFIX = ["env", *(f"{key}={value}" for key, value in SAFE_PATH_ENV.items())]


@dataclass
class LaunchPlan:
    nodes: int
    gpus_per_node: int
    recipe: str
    run_dir: str
    overrides: list[str] = field(default_factory=list)
    master_port: int = 29500
    init_from: str | None = None  # a new stage: the first start loads it, a requeued job resumes its own run
    keep_optimizer: bool | None = None

    def entry_args(self) -> list[str]:
        args = [self.recipe, "--out", self.run_dir, "--start-or-resume"]
        for assignment in self.overrides:
            args += ["--set", assignment]
        if self.init_from is not None:
            args += ["--init-from", self.init_from]
        if self.keep_optimizer is not None:
            args.append("--keep-optimizer" if self.keep_optimizer else "--reset-optimizer")
        return args


class RunStateError(RuntimeError):
    """A run directory a launched rank must not touch (not a kmodel run directory)."""


def run_state(run_dir: str | Path) -> str:
    """What `--start-or-resume` does with `run_dir`: "start" (absent or empty), "begin" (config.yaml written,
    nothing trained yet: kmodel.train.run.never_started) or "resume". A resume whose history has no checkpoint
    to continue from is refused by the resume's own checks (kmodel.train.run.check_resume_target), so a lost
    checkpoint folder never restarts a run. Raises RunStateError for a non-empty directory without config.yaml."""
    run = RunDir(run_dir)
    if not run.path.exists() or (run.path.is_dir() and not any(run.path.iterdir())):
        return "start"
    if not run.config.is_file():
        raise RunStateError(f"{run.path} is not empty and has no {run.config.name}: not a kmodel run directory; "
                            "give a new or empty --out")
    if not list_checkpoints(run.path) and never_started(run.path):
        return "begin"
    return "resume"


def validate_options(*, master_port: int, cpus_per_task: int, gpus_per_node: int | None) -> None:
    """Numbers from the command line that no launcher could use, refused before anything starts."""
    if not 1 <= master_port <= 65535:
        raise ValueError(f"--master-port {master_port} is not a TCP port (1-65535)")
    if cpus_per_task < 1:
        raise ValueError(f"--cpus-per-task must be at least 1, got {cpus_per_task}")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be positive, got {gpus_per_node}")


def accelerator_env(device_has_cuda: bool) -> dict[str, str]:
    """On a machine without a GPU the ranks use DeepSpeed's CPU accelerator (and gloo), so a parallel layout
    can be rehearsed anywhere; the launcher processes need it too, before they import DeepSpeed."""
    return {} if device_has_cuda else {"DS_ACCELERATOR": "cpu"}


def layout(cfg: Config, nodes: int, gpus_per_node: int | None) -> tuple[int, int]:
    """(nodes, GPUs per node) that multiply to the recipe's parallel.world_size."""
    world = cfg.parallel.world_size
    if nodes <= 0:
        raise ValueError(f"--nodes must be positive, got {nodes}")
    if gpus_per_node is None:
        if world % nodes:
            raise ValueError(f"parallel.world_size ({world}) is not divisible by --nodes {nodes}")
        gpus_per_node = world // nodes
    if nodes * gpus_per_node != world:
        raise ValueError(
            f"--nodes {nodes} x --gpus-per-node {gpus_per_node} = {nodes * gpus_per_node} processes, but the recipe's "
            f"parallel.world_size is {world}; change one (e.g. --set parallel.world_size={nodes * gpus_per_node})"
        )
    if world > 1 and cfg.parallel.backend != "deepspeed":
        raise ValueError("parallel.backend must be 'deepspeed' to launch more than one process")
    return nodes, gpus_per_node


def local_command(plan: LaunchPlan, launcher: str) -> list[str]:
    """One machine, `gpus_per_node` processes."""
    if launcher == "deepspeed":
        return [*SAFE_ENV_PREFIX, "deepspeed", "--num_gpus", str(plan.gpus_per_node),
                "--master_port", str(plan.master_port), "--module", ENTRY_MODULE, *plan.entry_args()]
    if launcher == "torchrun":
        return [*SAFE_ENV_PREFIX, "torchrun", "--standalone", "--nproc_per_node", str(plan.gpus_per_node),
                "-m", ENTRY_MODULE, *plan.entry_args()]
    raise ValueError(f"unknown launcher {launcher!r}; use deepspeed or torchrun")


def hostfile_text(hosts: list[str], slots: int) -> str:
    for host in hosts:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", host):
            raise ValueError(f"host name {host!r} is not a valid host name; --hosts takes comma-separated machine names")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def hostfile_command(plan: LaunchPlan, hostfile: str, master_addr: str) -> list[str]:
    """Several machines through DeepSpeed's pdsh/ssh runner and a hostfile (`host slots=N` per line)."""
    return [*SAFE_ENV_PREFIX, "deepspeed", "--hostfile", hostfile, "--num_nodes", str(plan.nodes),
            "--num_gpus", str(plan.gpus_per_node),
            "--master_addr", master_addr, "--master_port", str(plan.master_port),
            "--module", ENTRY_MODULE, *plan.entry_args()]


def render(template: str, values: dict[str, str]) -> str:
    """Fill {{name}} placeholders; a placeholder without a value, or a value without a placeholder, is an error."""
    names = set(re.findall(r"\{\{(\w+)\}\}", template))
    missing, unused = names - set(values), set(values) - names
    if missing or unused:
        raise ValueError(f"template placeholders missing values {sorted(missing)}, values without placeholder {sorted(unused)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def run_with_restarts(command: list[str], env: dict[str, str], max_restarts: int) -> int:
    """Run a launcher command; when it fails (a rank crashed, or hung and was stopped by its watchdog), start it
    again, up to `max_restarts` times. Every rank runs --start-or-resume, so each restart continues from the
    newest checkpoint the ledger recorded. A launcher ended by SIGINT or SIGTERM (the user, the scheduler) is
    not restarted."""
    stopped = {-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM}
    for attempt in range(max_restarts + 1):
        status = subprocess.call(command, env=env)
        if status == 0 or status in stopped or attempt == max_restarts:
            return status
        print(f"kmodel launch: the run exited with status {status}; restart {attempt + 1} of {max_restarts}, from "
              "its newest checkpoint", file=sys.stderr)
    return status


def sbatch_value(text: str, what: str) -> str:
    """A value for an #SBATCH line, double-quoted (sbatch splits directives on spaces, honouring quotes; the
    shell never expands them)."""
    if any(ch in text for ch in '"\n\r'):
        raise ValueError(f"{what} {text!r} cannot go into an #SBATCH line (a double quote or a line break); rename it")
    return f'"{text}"'


def slurm_script(plan: LaunchPlan, cfg: Config, *, time_limit: str, partition: str | None, ib_hca: str,
                 socket_ifname: str, local_staging: str, cpus_per_task: int) -> str:
    template = (TEMPLATE_DIR / "slurm.sbatch").read_text(encoding="utf-8")
    return render(template, {
        "job_name_sbatch": sbatch_value(cfg.name, "the recipe's name"),
        "output_sbatch": sbatch_value(f"{plan.run_dir}/slurm-%j.out", "--out"),
        "nodes": str(plan.nodes),
        "gpus_per_node": str(plan.gpus_per_node),
        "cpus_per_task": str(cpus_per_task),
        "time_limit": time_limit,
        "partition_line": f"#SBATCH --partition={sbatch_value(partition, '--partition')}" if partition else "",
        "run_dir": shlex.quote(plan.run_dir),
        "master_port": str(plan.master_port),
        "ib_hca": shlex.quote(ib_hca),
        "socket_ifname": shlex.quote(socket_ifname),
        "local_staging": shlex.quote(local_staging),
        "python": shlex.quote(sys.executable),
        "recipe": shlex.quote(plan.recipe),
        "overrides": " ".join(f"--set {shlex.quote(a)}" for a in plan.overrides),
    })
