"""Shared plumbing for the Triton kernels: compilation at first launch, device and dtype checks.

`triton.jit` decides between the GPU compiler and the CPU interpreter when it decorates a function. A kernel
module imported before a test sets TRITON_INTERPRET=1 would otherwise be stuck with the GPU compiler, so kernel
bodies (`lazy_kernel`) and their device functions (`jit_helper`) stay plain functions here and are wrapped on
first launch in the mode the environment asks for then, each kernel's helpers in a copy of its module's
namespace built for that mode. On GPU a kernel may be autotuned over `configs`; under the interpreter it runs
one fixed config (autotuning there would only repeat slow runs). Triton's own jit library (tl.sum, tl.sigmoid,
...) is rebound to the interpreter when triton was imported before TRITON_INTERPRET was set
(`interpret_triton_library`).

Used by every Triton module (attention, moe, norm, loss): one interpreter check (`interpreting`), one dot and
one dot-precision rule (`dot`, `dot_precision`), autocast's dtype (`matmul_dtype`), one lazy-kernel mechanism.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1), read now."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors with the interpreter on."""
    for tensor in tensors:
        if tensor.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"Triton kernels need CUDA tensors, got a tensor on {tensor.device}; "
                "set TRITON_INTERPRET=1 to run them on the CPU interpreter (slow, for tests)"
            )


def matmul_dtype(op: str, *tensors: torch.Tensor) -> torch.dtype:
    """The dtype an op's matmuls run in: autocast's when it is on (as torch.matmul would), else the inputs' own.

    Callers cast their inputs to it before entering their autograd Function, so autograd carries the
    gradients back through the cast to fp32 master weights.
    """
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtypes = {tensor.dtype for tensor in tensors}
    if len(dtypes) != 1:
        raise TypeError(f"{op}: inputs must share one dtype (or run under autocast), got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision matching torch.matmul: fp32 uses TF32 only when torch allows it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dot(a, b, acc=None, input_precision=None, _semantic=None):
    """tl.dot for every kernel here, right under the interpreter too: call it as `dot(a, b, acc, input_precision=P)`.

    Triton's interpreter keeps bf16 tiles as raw uint16 and multiplies those integers (a 32x32 bf16 product
    comes out with relative error ~1e9), so there the operands are widened to fp32 first, which is exact:
    the GPU's bf16 MMA also forms exact products and sums them in fp32. On the GPU this is tl.dot itself.

    It is a Triton builtin (as tl.dot is) rather than a @triton.jit function, so kernel bodies can call it
    whichever mode they are built in: the compiler passes `_semantic`; the interpreter runs the body as
    Python with triton.language patched and passes nothing.
    """
    import triton.language as tl

    if _semantic is not None:
        return tl.dot(a, b, acc, input_precision=input_precision, _semantic=_semantic)
    if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
        a, b, input_precision = a.to(tl.float32), b.to(tl.float32), "ieee"
    return tl.dot(a, b, acc, input_precision=input_precision)


dot.__triton_builtin__ = True  # the mark tl.core.builtin sets: the compiler then calls it with `_semantic`


_library_interpretable = False


def _round_bf16_to_nearest_even() -> None:
    """Make the interpreter round fp32 -> bf16 to nearest even, as the GPU does.

    Triton 3.9's interpreter truncates instead (it passes no rounding mode to its own converter), a bias of up
    to one bf16 unit towards zero at every cast and bf16 store; through a few layers of the tiny model that
    moved logits by ~15% of their size and hid real bf16 differences behind it.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        values = np.array(src.data, dtype=np.float32)  # a copy of the same shape, 0-d included
        bits = values.view(np.uint32).astype(np.uint64)
        nearest_even = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40  # a NaN stays NaN rather than rounding to inf
        rounded = np.asarray(np.where(np.isnan(values), quiet_nan, nearest_even), dtype=np.uint16)
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def interpret_triton_library() -> None:
    """Make triton.language's own @jit functions (tl.sum, tl.max, tl.sigmoid, ...) runnable by the interpreter,
    and its fp32 -> bf16 casts round as on the GPU (`_round_bf16_to_nearest_even`).

    triton wraps them when it is first imported, in the mode TRITON_INTERPRET gave then; if another module
    imported triton before the variable was set, they are compiler-only JITFunctions that the interpreter
    refuses to call. Only done when kernels are about to run on the interpreter, i.e. in a process that cannot
    compile for a GPU anyway.
    """
    global _library_interpretable
    if _library_interpretable:
        return
    _round_bf16_to_nearest_even()
    import sys

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    rebound: dict[int, InterpretedFunction] = {}  # one wrapper per function, shared by every module naming it
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                wrapper = rebound.setdefault(id(value), InterpretedFunction(value.fn))
                setattr(module, attr, wrapper)
    _library_interpretable = True


def tuning_configs(configs: Sequence[Any]) -> list[Any]:
    """The autotune candidates to use: all of them, or only the first with KMODEL_TRITON_CONFIGS=first (a quick
    correctness pass, as `kmodel bench gpu` runs the tests: every config of every kernel variant would take
    most of its time budget to compile)."""
    return list(configs)[:1] if os.environ.get("KMODEL_TRITON_CONFIGS") == "first" else list(configs)


# Set by `replay_autotuning`: under the interpreter, autotuned launches replay triton.autotune's first call.
_replayed_winner: int | None = None


@contextlib.contextmanager
def replay_autotuning(winner: int = 0):
    """Under the interpreter, make every autotuned LazyKernel launch do what triton.autotune does on a GPU the
    first time it meets a key: run every config on the live arguments (its benchmark), then the winner,
    `configs[winner]`, once more. A kernel whose result depends on what an earlier config left in its
    buffers (a partial-sum column only some block sizes write, say) then fails its test on the CPU too."""
    global _replayed_winner
    previous, _replayed_winner = _replayed_winner, winner
    try:
        yield
    finally:
        _replayed_winner = previous


def replayed_winner() -> int | None:
    """Inside `replay_autotuning`: the index of the config it makes the winner; else None."""
    return _replayed_winner


class JitHelper:
    """A @triton.jit device function for LazyKernel bodies (`jit_helper`): kept plain, and jitted together with
    the kernel that calls it, in that kernel's mode."""

    def __init__(self, fn: Callable):
        self.fn = fn


def jit_helper(fn: Callable) -> JitHelper:
    return JitHelper(fn)


# (id of a module's namespace, interpret) -> a copy of it whose JitHelpers are jitted in that mode.
_mode_namespaces: dict[tuple[int, bool], dict] = {}


def _in_mode(fn: Callable, interpret: bool):
    """triton.jit of `fn` rebuilt over its module's namespace for this mode, where its helpers are jitted too."""
    import types

    import triton

    key = (id(fn.__globals__), interpret)
    if key not in _mode_namespaces:
        namespace = dict(fn.__globals__)
        for name, value in list(namespace.items()):
            if isinstance(value, JitHelper):
                helper = value.fn
                namespace[name] = triton.jit(types.FunctionType(helper.__code__, namespace, helper.__name__,
                                                                helper.__defaults__, helper.__closure__))
        _mode_namespaces[key] = namespace
    namespace = _mode_namespaces[key]
    return triton.jit(types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__))


class LazyKernel:
    """A Triton kernel body plus how to launch it: `kernel[grid](*args, **kwargs)` as with triton.jit.

    configs/key: autotuning space and key (argument names) on GPU; None launches without autotuning.
    interpret_config: meta-parameters passed under the interpreter in place of autotuning (the grid function
    sees them too, as it would see an autotuned config); inside `replay_autotuning`, the configs instead.
    """

    def __init__(
        self,
        body: Callable,
        configs: Sequence[Any] | None = None,
        key: Sequence[str] = (),
        interpret_config: dict[str, Any] | None = None,
    ):
        self.body = body
        self.configs = configs
        self.key = list(key)
        self.interpret_config = dict(interpret_config or {})
        self.arg_names = list(inspect.signature(body).parameters)
        self._jitted: dict[bool, Any] = {}
        self._compiled: dict[bool, Any] = {}

    def jit_function(self, interpret: bool | None = None):
        """The body (and its helpers) jitted for the interpreter or the compiler (default: the current mode),
        without autotuning: what compile checks and hand-made autotuners take."""
        interpret = interpreting() if interpret is None else interpret
        if interpret not in self._jitted:
            if interpret:
                interpret_triton_library()
            # knobs read TRITON_INTERPRET when jit wraps the body, which is now.
            self._jitted[interpret] = _in_mode(self.body, interpret)
        return self._jitted[interpret]

    def _kernel(self, interpret: bool):
        if interpret not in self._compiled:
            import triton

            kernel = self.jit_function(interpret)
            if self.configs is not None and not interpret:
                kernel = triton.autotune(configs=tuning_configs(self.configs), key=self.key)(kernel)
            self._compiled[interpret] = kernel
        return self._compiled[interpret]

    def __getitem__(self, grid):
        interpret = interpreting()
        kernel = self._kernel(interpret)[grid]
        if not interpret:
            return kernel
        if _replayed_winner is not None and self.configs:
            configs = list(self.configs)
            sequence = [*configs, configs[_replayed_winner]]

            def replay(*args, **kwargs):
                for config in sequence:
                    kernel(*args, **kwargs, **config.kwargs)

            return replay
        return lambda *args, **kwargs: kernel(*args, **kwargs, **self.interpret_config)


def lazy_kernel(
    configs: Sequence[Any] | None = None,
    key: Sequence[str] = (),
    interpret_config: dict[str, Any] | None = None,
) -> Callable[[Callable], LazyKernel]:
    """Decorator form of LazyKernel."""
    return lambda body: LazyKernel(body, configs, key, interpret_config)
