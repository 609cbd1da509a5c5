"""kmodel.kernels: the compute ops the model calls, each as a plain-PyTorch reference and a Triton version.

One folder per op family. Each holds `reference.py` (plain PyTorch, the semantics) and `triton_impl.py`
(Triton kernels behind autograd Functions) exposing the same function names with the same signatures, so
tests compare them directly and the model switches between them with the recipe's `kernels:` section:

    attention   attention(q, k, v, *, window, causal, scale, cu_seqlens)
    norm        rms_norm(x, weight, eps)
    loss        linear_cross_entropy(hidden, weight, targets, *, ignore_index, z_loss_coef)
    moe         route(...), permute(...), grouped_swiglu(...), combine(...), moe_experts(...)

This package knows torch and triton only, never the model.
"""

from __future__ import annotations

from kmodel.safe_path import defer_bare_import

defer_bare_import(__name__, __file__)  # `import kernels` from the repository root means Hugging Face's package

import importlib  # noqa: E402
from types import ModuleType  # noqa: E402

import torch  # noqa: E402

OPS = ("attention", "norm", "loss", "moe")
CHOICES = ("torch", "triton", "auto")
_MODULE = {"torch": "reference", "triton": "triton_impl"}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(choice: str, device: torch.device | str) -> str:
    """Turn a recipe choice into an implementation name: `auto` means Triton on CUDA, PyTorch elsewhere."""
    if choice not in CHOICES:
        raise ValueError(f"kernel choice {choice!r} is not one of {CHOICES}")
    if choice == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    return choice


def load(op: str, impl: str) -> ModuleType:
    """The module implementing `op` with `impl` ('torch' or 'triton')."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known ops: {OPS}")
    if impl == "triton" and not triton_available():
        raise RuntimeError(f"kernels.{op} = 'triton' but triton is not installed (pip install 'kmodel[triton]')")
    return importlib.import_module(f"{__name__}.{op}.{_MODULE[impl]}")
