"""`kmodel bench ops`: the fused ops every layer runs — RMSNorm, and the LM head's linear + cross-entropy.

RMSNorm: Triton (kmodel.kernels.norm.triton_impl) vs torch.nn.RMSNorm (its F.rms_norm) vs our reference, forward
and forward+backward; GB/s counts compulsory traffic (forward reads x and writes y; the backward reads x and
d y and writes d x).
Linear + cross-entropy (+ z-loss 1e-4): the Triton vocabulary-chunked loss (kmodel.kernels.loss.triton_impl)
vs plain logits + F.cross_entropy vs our reference; reported with its peak CUDA memory, the point of fusing:
the plain version holds the (tokens, vocabulary) logits, their fp32 copy and gradient at once.

On CUDA the defaults are K-EXAONE-like shapes (hidden 2048-6144, 8k-32k tokens, vocabulary 153,600 and
262,144). Without CUDA a reduced CPU mode (tiny shapes, the PyTorch implementations; Triton too under
TRITON_INTERPRET=1) shows the script works; its table says CPU and is no performance claim.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kmodel.kernels.loss import reference as loss_reference
from kmodel.kernels.benchmarking import (
    device_name,
    device_slug,
    environment,
    measure,
    per_second,
    pick_device,
    write_results,
)
from kmodel.kernels.triton_support import interpreting
from kmodel.kernels.norm import reference as norm_reference

MODES = ("forward", "forward+backward")
Z_LOSS = 1e-4
EPS = 1e-6
GPU_NORM_SHAPES = [(tokens, hidden) for tokens in (8192, 32768) for hidden in (2048, 4096, 6144)]
GPU_LOSS_SHAPES = [(8192, 2048, 153600), (8192, 6144, 153600), (16384, 6144, 153600), (8192, 4096, 262144)]
CPU_NORM_SHAPES = [(256, 64)]
CPU_LOSS_SHAPES = [(128, 32, 1000)]


def _triton_norm(x, weight):
    from kmodel.kernels.norm import triton_impl

    return triton_impl.rms_norm(x, weight, EPS)


def _torch_norm(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, EPS)


def _reference_norm(x, weight):
    return norm_reference.rms_norm(x, weight, EPS)


NORMS = {"triton": _triton_norm, "torch.nn.RMSNorm": _torch_norm, "reference": _reference_norm}


def _triton_loss(hidden, weight, targets):
    from kmodel.kernels.loss import triton_impl

    return triton_impl.linear_cross_entropy(hidden, weight, targets)


def _plain_loss(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets), torch.logsumexp(logits, dim=-1).pow(2).mean()


LOSSES = {
    "triton": _triton_loss,
    "plain logits + F.cross_entropy": _plain_loss,
    "reference": loss_reference.linear_cross_entropy,
}


def _triton_reason(device: torch.device) -> str | None:
    if device.type != "cuda" and not interpreting():
        return "Triton kernels need CUDA (on CPU only under TRITON_INTERPRET=1, the slow test interpreter)"
    return None


def _norm_rows(tokens, hidden, impls, modes, dtype, device, args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
    grad = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    rows = []
    for mode in modes:
        group = []
        for impl in impls:
            def call(fn=NORMS[impl], mode=mode):
                out = fn(x, weight)
                if mode != "forward":
                    out.backward(grad)

            result = measure(call, device, warmup=args.warmup, iters=args.iters)
            traffic = (2 if mode == "forward" else 5) * tokens * hidden * dtype.itemsize
            group.append({"op": "rms_norm", "shape": f"{tokens}x{hidden}", "mode": mode, "impl": impl, **result,
                          "gbps": per_second(traffic / 1e9, result["ms"])})
        rows += _relative(group, "torch.nn.RMSNorm")
    return rows


def _loss_rows(tokens, hidden_size, vocab, impls, modes, dtype, device, args) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    rows = []
    for mode in modes:
        group = []
        for impl in impls:
            def call(fn=LOSSES[impl], mode=mode):
                ce, z = fn(hidden, weight, targets)
                if mode != "forward":
                    (ce + Z_LOSS * z).backward()

            result = measure(call, device, warmup=args.warmup, iters=args.iters)
            flops = (2 if mode == "forward" else 6) * tokens * hidden_size * vocab
            group.append({"op": "linear_cross_entropy", "shape": f"{tokens}x{hidden_size}, V={vocab}",
                          "mode": mode, "impl": impl, **result, "tflops": per_second(flops / 1e12, result["ms"])})
        rows += _relative(group, "plain logits + F.cross_entropy")
    return rows


def _relative(group: list[dict], baseline: str) -> list[dict]:
    """Adds the speed-up over the baseline row and its peak memory / this row's, within one (shape, mode)."""
    base = next((row for row in group if row["impl"] == baseline), {})
    for row in group:
        ran = row["ms"] and base.get("ms")
        row["vs_baseline"] = base["ms"] / row["ms"] if ran else None
        row["memory_saving"] = base["peak_mib"] / row["peak_mib"] if ran and row["peak_mib"] else None
    return group


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmodel bench ops",
        description="Time RMSNorm (Triton vs torch.nn.RMSNorm vs reference) and the LM-head linear + "
        "cross-entropy + z-loss (Triton vocabulary-chunked vs plain logits + F.cross_entropy vs reference), "
        "forward and forward+backward, with peak CUDA memory; write a markdown table and JSON named after the "
        "device under --out-dir. Without CUDA: a reduced CPU mode that only shows the script works.",
    )
    parser.add_argument("--op", nargs="+", choices=("norm", "loss"), default=["norm", "loss"],
                        help="which ops to time (default both)")
    parser.add_argument("--norm-shape", nargs=2, type=int, action="append", metavar=("TOKENS", "HIDDEN"),
                        help="an RMSNorm shape; repeatable (default: 8192 and 32768 tokens x hidden 2048, 4096, "
                        "6144 on CUDA; 256 x 64 on CPU)")
    parser.add_argument("--loss-shape", nargs=3, type=int, action="append", metavar=("TOKENS", "HIDDEN", "VOCAB"),
                        help="a linear + cross-entropy shape; repeatable (default: K-EXAONE-like shapes with "
                        "vocabularies 153600 and 262144 on CUDA; 128 x 32, V=1000 on CPU)")
    parser.add_argument("--impl", nargs="+", choices=("triton", "torch", "reference"),
                        help="implementations: triton, torch (torch.nn.RMSNorm / plain logits + F.cross_entropy), "
                        "reference (default: all that run on the device)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                        help="forward only and/or forward+backward (default both)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls; the median is reported (default 10)")
    parser.add_argument("--out-dir", default="bench/results",
                        help="where the table and JSON go (default bench/results)")
    parser.add_argument("--name", help="file stem (default ops_<device>, e.g. ops_nvidia_h100_80gb_hbm3 or ops_cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if on_gpu else "fp32")]
    wanted = args.impl or ["triton", "torch", "reference"]
    reason = _triton_reason(device)
    if "triton" in wanted and reason:
        if args.impl:
            raise RuntimeError(f"--impl triton: {reason}")
        wanted.remove("triton")
    rows = []
    if "norm" in args.op:
        impls = [{"torch": "torch.nn.RMSNorm"}.get(impl, impl) for impl in wanted]
        for tokens, hidden in args.norm_shape or (GPU_NORM_SHAPES if on_gpu else CPU_NORM_SHAPES):
            rows += _norm_rows(tokens, hidden, impls, args.mode, dtype, device, args)
    if "loss" in args.op:
        impls = [{"torch": "plain logits + F.cross_entropy"}.get(impl, impl) for impl in wanted]
        for tokens, hidden, vocab in args.loss_shape or (GPU_LOSS_SHAPES if on_gpu else CPU_LOSS_SHAPES):
            rows += _loss_rows(tokens, hidden, vocab, impls, args.mode, dtype, device, args)

    notes = [
        f"Device: **{device_name(device)}**, {str(dtype).replace('torch.', '')}, median of {args.iters} calls "
        f"after {args.warmup} warm-up calls. vs_baseline: speed-up over torch.nn.RMSNorm (norm) or plain "
        "logits + F.cross_entropy (loss); memory_saving: the baseline's peak memory / this row's.",
        "GB/s (norm) counts compulsory traffic; TFLOP/s (loss) counts the LM-head GEMMs once (2·N·H·V forward, "
        f"3x forward+backward; the Triton loss recomputes the logits in its backward). The loss adds {Z_LOSS} z-loss. "
        "peak_mib is the CUDA high-water mark of one call above what was allocated before (n/a on CPU).",
    ]
    if not on_gpu:
        interpreter = " Triton rows ran on the Triton interpreter." if "triton" in wanted else ""
        notes.insert(0, "**Reduced CPU mode**: tiny shapes on the CPU, only to show the benchmark runs; not a "
                     "performance claim." + interpreter)
    columns = ["op", "shape", "mode", "impl", "ms", "gbps", "tflops", "peak_mib", "vs_baseline", "memory_saving"]
    if any("error" in row for row in rows):
        columns.append("error")
    write_results(
        args.out_dir, args.name or f"ops_{device_slug(device)}", f"Fused ops benchmark on {device_name(device)}",
        notes, columns, rows, {"benchmark": "ops", "reduced_cpu_mode": not on_gpu, **environment(device, dtype)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
