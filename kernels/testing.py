"""How a low-precision kernel result is judged, shared by the kernel tests and `kmodel bench gpu`.

Against float64, with a bound scaled to each tensor: the kernel's largest error may be at most twice that of
the reference computed in the same low precision (flash-attention's rule: rounding is expected, twice
PyTorch's own is not), plus `slack` times the tensor's largest float64 value for orderings that round
differently. Never a fixed absolute tolerance: atol = 2e-2 passes an all-zero gradient whose true entries are
below 2e-3; here a zero result errs by the tensor's whole size and fails.
"""

from __future__ import annotations

import torch


def low_precision_error(got: torch.Tensor, low: torch.Tensor, want: torch.Tensor, *, slack: float = 1e-2):
    """(passed, message) for `got` against float64 `want`, with `low` the reference run in got's precision."""
    want = want.detach().double()
    got, low = got.detach().double().to(want.device), low.detach().double().to(want.device)
    if got.shape != want.shape:
        return False, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        return False, "non-finite values"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    base = (low - want).abs().max().item() if got.numel() else 0.0
    size = want.abs().max().item() if got.numel() else 0.0
    bound = 2 * base + slack * size
    message = f"error {err:.3g} vs bound {bound:.3g} (low-precision reference {base:.3g}, largest {size:.3g})"
    return err <= bound, message


def assert_low_precision_close(name: str, got, low, want, *, slack: float = 1e-2) -> None:
    passed, message = low_precision_error(got, low, want, slack=slack)
    assert passed, f"{name}: {message}"
