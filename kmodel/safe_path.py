"""Keeping the repository root off `sys.path`, so our top-level folders never stand in for other packages.

The repository keeps two import packages at its top level, `kernels/` (installed as `kmodel.kernels`) and
`tokenizer/` (installed as `kmodel.tokenizer`). Python puts the working directory first on `sys.path` for
`python -m ...`, `python -c ...` and the interactive prompt, so a process started from the repository root
would find our folders under their bare names before any installed package of the same name. That is not
hypothetical: transformers imports Hugging Face's `kernels` package, and got ours instead.

Two defences, each enough on its own for the cases it covers:

1. Every Python process kmodel starts (launchers, torchrun and DeepSpeed ranks, SLURM steps, the tests'
   subprocesses, CI) runs with `-P` or `PYTHONSAFEPATH=1` (Python >= 3.11), which leaves the working directory
   off `sys.path`; kmodel itself is always imported from its installation. `python_command` and `safe_env`
   build those commands.
2. For the processes somebody starts by hand (`python -m pytest`, `python -c` from the root), the folders
   themselves call `defer_bare_import` first thing: imported under the bare name, they load the installed
   package of that name in their place (or, if none is installed, fail naming the fix) instead of posing as it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

SAFE_PATH_ENV = {"PYTHONSAFEPATH": "1"}


def python_command(*args: str) -> list[str]:
    """`python -P ARGS...` with this interpreter: the child never has the working directory on sys.path."""
    return [sys.executable, "-P", *args]


def safe_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for child processes (torchrun and DeepSpeed workers, which start `python -m` themselves)
    in which every Python started keeps the working directory off sys.path. DeepSpeed's multi-node runner
    forwards PYTHON* variables to the other nodes."""
    return {**(os.environ if base is None else base), **SAFE_PATH_ENV}


def defer_bare_import(module_name: str, init_file: str) -> None:
    """Called first by `kernels/__init__.py` and `tokenizer/__init__.py` with their `__name__` and `__file__`.

    Imported as `kmodel.<folder>` this does nothing. Imported under the bare folder name, which happens only when
    the repository root is on sys.path, the caller meant another distribution: load the installed package of
    that name in our place (the import statement returns whatever `sys.modules[name]` holds once the module body
    finishes), or raise ImportError naming the fix when no such package is installed.
    """
    if "." in module_name:
        return
    repo_root = Path(init_file).resolve().parent.parent
    elsewhere = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != repo_root]
    spec = importlib.machinery.PathFinder.find_spec(module_name, elsewhere)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"'import {module_name}' found the folder {repo_root / module_name}, which is kmodel's and is imported as "
            f"'kmodel.{module_name}', and no installed package named {module_name!r} exists. The repository root "
            f"is on sys.path because Python was started there with -m/-c; start it with 'python -P' instead.",
            name=module_name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
