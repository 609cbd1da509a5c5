"""Benchmark causal / sliding-window attention: kmodel's Triton kernel against PyTorch and flash-attn.

Times the forward and forward+backward passes over (batch, seq, heads, head_dim) inputs and reports time and
TFLOP/s counting only the visible (query, key) pairs, so a sliding window is credited only for the area it
computes. Writes the table as markdown and JSON under bench/results/, named after the device.

    kmodel bench attention                       # on CUDA: seq 4k-32k, windows 128/1024/4096/global
    kmodel bench attention --device cpu --seq 256 --windows 64 none    # CPU smoke run: torch impls only
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from kmodel.kernels.attention import reference
from kmodel.kernels.benchmarking import device_name, device_slug, environment, time_ms, write_results

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA_IMPLS = ["triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "flash-attn", "reference"]
CPU_IMPLS = ["reference", "sdpa"]
# Backward matmuls (dV, dP, dQ, dK, plus the recomputed scores) against the forward's two: FLOPs x 2.5.
BACKWARD_FLOP_RATIO = 2.5


class Unsupported(Exception):
    """The implementation cannot run this configuration (reported in the table, not raised)."""


def visible_pairs(seq: int, window: int | None) -> int:
    """(query, key) pairs a causal query sees: sum over i of min(i + 1, window)."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


def attention_flops(
    batch: int, seq: int, q_heads: int, head_dim: int, window: int | None, v_dim: int | None = None
) -> int:
    """Forward FLOPs: QK^T (2 * head_dim) and PV (2 * v_dim) per visible pair and query head."""
    return 2 * batch * q_heads * (head_dim + (v_dim or head_dim)) * visible_pairs(seq, window)


def _sdpa(backend_name: str | None) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }

    def run(q, k, v, window):
        if window is not None:
            raise Unsupported("no sliding window without a dense mask")
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[2] != k.shape[2]
        if backend_name is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
        else:
            with sdpa_kernel(backends[backend_name]):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
        return out.transpose(1, 2)

    return run


def _flex() -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[tuple, object] = {}

    def run(q, k, v, window):
        seq = q.shape[1]
        key = (seq, window, q.device)
        if key not in masks:

            def visible(b, h, q_idx, kv_idx):
                causal = q_idx >= kv_idx
                return causal if window is None else causal & (q_idx - kv_idx < window)

            masks[key] = create_block_mask(visible, None, None, seq, seq, device=q.device)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = compiled(qt, kt, vt, block_mask=masks[key], enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    return run


def _flash_attn() -> Callable:
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise Unsupported("flash-attn is not installed") from err

    def run(q, k, v, window):
        return flash_attn_func(q, k, v, causal=True, window_size=(-1, -1) if window is None else (window - 1, 0))

    return run


def _triton() -> Callable:
    from kmodel.kernels.attention import triton_impl

    return lambda q, k, v, window: triton_impl.attention(q, k, v, window=window)


def make_impl(name: str) -> Callable:
    """A function (q, k, v, window) -> out over (batch, seq, heads, head_dim) tensors, causal."""
    if name == "reference":
        return lambda q, k, v, window: reference.attention(q, k, v, window=window)
    if name == "sdpa":
        return _sdpa(None)
    if name.startswith("sdpa-"):
        return _sdpa(name.removeprefix("sdpa-"))
    if name == "flex":
        return _flex()
    if name == "flash-attn":
        return _flash_attn()
    if name == "triton":
        return _triton()
    raise ValueError(f"unknown implementation {name!r}; known: {sorted(set(CUDA_IMPLS + CPU_IMPLS))}")


def _significant(x: float) -> float:
    return float(f"{x:.4g}")


def _forward(impl: Callable, q, k, v, window):
    with torch.no_grad():
        return impl(q, k, v, window)


def _forward_backward(impl: Callable, q, k, v, window, grad_out):
    impl(q, k, v, window).backward(grad_out)


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    rows = []
    for name in args.impls:
        try:
            impl = make_impl(name)
        except Unsupported as err:
            print(f"skip {name}: {err}")
            continue
        for seq in args.seq:
            gen = torch.Generator(device=device).manual_seed(seq)
            shape = (args.batch, seq)
            v_dim = args.v_dim or args.head_dim
            q = torch.randn(*shape, args.q_heads, args.head_dim, generator=gen, device=device, dtype=dtype)
            k = torch.randn(*shape, args.kv_heads, args.head_dim, generator=gen, device=device, dtype=dtype)
            v = torch.randn(*shape, args.kv_heads, v_dim, generator=gen, device=device, dtype=dtype)
            grad_out = torch.randn(*shape, args.q_heads, v_dim, generator=gen, device=device, dtype=dtype)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            for window in args.windows:
                row = dict(impl=name, seq=seq, window=window or "global")
                flops = attention_flops(args.batch, seq, args.q_heads, args.head_dim, window, v_dim)

                try:
                    timing = dict(warmup=args.warmup, iters=args.repeats)
                    fwd = time_ms(partial(_forward, impl, q, k, v, window), device, **timing)
                    both = time_ms(partial(_forward_backward, impl, q, k, v, window, grad_out), device, **timing)
                except Unsupported as err:
                    row.update(note=str(err))
                except (RuntimeError, torch.OutOfMemoryError) as err:  # a backend refusing a shape or dtype
                    row.update(note=f"error: {str(err).splitlines()[0][:120]}")
                else:
                    row.update(
                        fwd_ms=_significant(fwd),
                        fwd_tflops=_significant(flops / fwd / 1e9),
                        fwd_bwd_ms=_significant(both),
                        fwd_bwd_tflops=_significant(flops * (1 + BACKWARD_FLOP_RATIO) / both / 1e9),
                    )
                q.grad = k.grad = v.grad = None
                rows.append(row)
                print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    return rows


def _window(text: str) -> int | None:
    if text.lower() in ("none", "global"):
        return None
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"window must be positive or 'none', got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="kmodel bench attention",
        description="Time causal / sliding-window attention (forward and forward+backward) across implementations "
        "and report TFLOP/s over the visible area only.",
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device (default: cuda if present)")
    parser.add_argument("--dtype", choices=DTYPES, help="element type (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--impls", nargs="+", help=f"implementations to time (default CUDA: {CUDA_IMPLS}; CPU: "
                        f"{CPU_IMPLS}); sdpa-* pin one SDPA backend, flex is FlexAttention with a block mask")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="sequence lengths")
    parser.add_argument("--windows", type=_window, nargs="+", default=[128, 1024, 4096, None],
                        help="sliding windows; 'none' means global causal attention")  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--q-heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA when fewer than query heads)")
    parser.add_argument("--head-dim", type=int, default=128, help="query/key head dimension")
    parser.add_argument("--v-dim", type=int, help="value head dim if it differs (MLA: --head-dim 192 --v-dim 128)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation, autotuning)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported")
    parser.add_argument(
        "--out", type=Path, help="write OUT.md and OUT.json (default: bench/results/attention_<device>)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available; use --device cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.impls = args.impls or (CUDA_IMPLS if device.type == "cuda" else CPU_IMPLS)
    if "triton" in args.impls and device.type != "cuda":
        raise SystemExit("the triton impl needs CUDA (the CPU interpreter is for tests, not timing)")
    if args.q_heads % args.kv_heads:
        raise SystemExit(f"--q-heads {args.q_heads} must be a multiple of --kv-heads {args.kv_heads}")

    rows = run_benchmark(args)
    dims = f"head_dim {args.head_dim}" + (f" (v {args.v_dim})" if args.v_dim else "")
    shape = f"batch {args.batch}, {args.q_heads} q / {args.kv_heads} kv heads, {dims}, {args.dtype}"
    notes = [
        f"Median of {args.repeats} calls after {args.warmup} warm-up calls (compilation, autotuning). TFLOP/s counts "
        f"the visible (query, key) pairs only, so a window is credited with the area it computes; forward+backward "
        f"counts {1 + BACKWARD_FLOP_RATIO}x the forward's FLOPs.",
    ]
    if device.type == "cpu":
        notes.insert(0, "CPU smoke run: checks the script, not a performance figure.")
    columns = ["impl", "seq", "window", "fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops", "note"]
    out = args.out or Path("bench/results") / f"attention_{device_slug(device)}"
    meta = dict(vars(args), out=str(out), flops_backward_ratio=BACKWARD_FLOP_RATIO, benchmark="attention")
    meta["windows"] = [w or "global" for w in args.windows]
    write_results(out.parent, out.name, f"Causal attention on {device_name(device)} ({shape})", notes, columns, rows,
                  {**meta, **environment(device, DTYPES[args.dtype])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
