"""Our top-level `kernels/` and `tokenizer/` folders never stand in for installed packages (kmodel.safe_path).

The defect: `python -m pytest` from the repository root put the root first on sys.path, so transformers'
hub-kernels integration (`from kernels import CUDAProperties`) imported our `kernels/` folder and failed.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kmodel.config import load_config
from kmodel.parallel import launch
from kmodel.safe_path import SAFE_PATH_ENV, python_command

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-ko-moe.yaml"

PROBE = textwrap.dedent(
    f"""
    from pathlib import Path

    import torch

    REPO = Path({str(REPO)!r})


    def test_transformers_hub_kernels_and_a_kmodel_model_in_one_process():
        import transformers.integrations.hub_kernels  # noqa: F401  (runs `from kernels import CUDAProperties, ...`)
        import kernels

        assert Path(kernels.__file__).resolve().parent != REPO / "kernels"
        assert hasattr(kernels, "CUDAProperties")

        from kmodel.config import load_config
        from kmodel.model import build_model

        cfg = load_config({str(TINY)!r})
        model = build_model(cfg, "cpu")
        ids = torch.randint(0, cfg.model.vocab_size, (1, 8))
        assert model(ids, labels=ids).loss.isfinite()
    """
)


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _unsafe_env() -> dict[str, str]:
    """The environment a person has: nothing keeps the working directory off sys.path."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONSAFEPATH"}


@pytest.mark.skipif(not _hub_kernels_installed(), reason="Hugging Face's `kernels` package is not installed")
@pytest.mark.parametrize("interpreter_flags", [["-P"], []], ids=["python -P -m pytest", "python -m pytest"])
def test_readme_test_command_from_the_repository_root(interpreter_flags, tmp_path):
    """Both the README's command (`python -P -m pytest`) and the habitual `python -m pytest`, started in the
    repository root, import Hugging Face's `kernels` for transformers and build a kmodel model in one process."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, *interpreter_flags, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(probe)],
        cwd=REPO, env=_unsafe_env(), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout


def test_bare_import_of_our_folder_without_an_installed_namesake_names_the_fix():
    """No package named `tokenizer` is installed: `import tokenizer` from the root fails and says why, instead
    of handing out kmodel's tokenizer under a name it does not own."""
    done = subprocess.run([sys.executable, "-c", "import tokenizer"], cwd=REPO, env=_unsafe_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "imported as 'kmodel.tokenizer'" in done.stderr and "python -P" in done.stderr


def test_python_command_keeps_the_working_directory_off_sys_path():
    check = "import os, sys; print(any(p in ('', os.getcwd()) for p in sys.path))"
    child = subprocess.run(python_command("-c", check), cwd=REPO, env=_unsafe_env(), capture_output=True, text=True)
    assert child.stdout.strip() == "False", child.stderr
    # The launchers' prefix, which torchrun and DeepSpeed ranks inherit through the environment.
    prefixed = subprocess.run([*launch.SAFE_ENV_PREFIX, sys.executable, "-c", check], cwd=REPO, env=_unsafe_env(),
                              capture_output=True, text=True)
    assert prefixed.stdout.strip() == "False", prefixed.stderr


def test_every_launcher_starts_its_ranks_with_a_safe_path():
    cfg = load_config(TINY, ["parallel.backend=deepspeed", "parallel.world_size=2", "parallel.zero_stage=1"])
    plan = launch.LaunchPlan(nodes=1, gpus_per_node=2, recipe=str(TINY), run_dir="/tmp/run")
    prefix = ["env", *(f"{key}={value}" for key, value in SAFE_PATH_ENV.items())]
    for command in (launch.local_command(plan, "torchrun"), launch.local_command(plan, "deepspeed"),
                    launch.hostfile_command(plan, "hosts", "node0")):
        assert command[:len(prefix)] == prefix, command
    slurm = launch.slurm_script(plan, cfg, time_limit="1:00:00", partition=None, ib_hca="mlx5", socket_ifname="eth0",
                                local_staging="/tmp", cpus_per_task=8)
    assert "export PYTHONSAFEPATH=1" in slurm
    assert re.search(r"\S+python\S* -P -m kmodel\.parallel\.entry", slurm)


def test_no_python_is_started_without_a_safe_path():
    """Every place that starts Python goes through kmodel.safe_path, so none can put the repository root back on
    sys.path. A command built from `sys.executable` directly is flagged with its file and line."""
    allowed = {REPO / "kmodel" / "safe_path.py", Path(__file__).resolve()}
    direct = re.compile(r"\[\s*sys\.executable\s*,(?!\s*[\"']-P[\"'])")
    offenders = []
    for folder in ("kmodel", "kernels", "tokenizer", "tests", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path in allowed:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if direct.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "use kmodel.safe_path.python_command:\n" + "\n".join(offenders)
