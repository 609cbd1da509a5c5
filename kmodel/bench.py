"""`kmodel bench NAME [options]`: run a benchmark that lives beside the code it measures."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "attention": ("kmodel.kernels.attention.bench", "Triton hybrid attention vs SDPA / FlexAttention / flash-attn"),
    "moe": ("kmodel.kernels.moe.bench", "MoE layer: fused Triton kernels vs per-expert loop / grouped_mm / reference"),
    "ops": ("kmodel.kernels.loss.bench", "RMSNorm and fused linear + cross-entropy vs PyTorch"),
    "norm": ("kmodel.kernels.norm.bench", "RMSNorm alone: Triton vs torch.nn.RMSNorm vs reference"),
    "gpu": ("kmodel.bench_gpu", "one H100 run: GPU tests, autotuned checks, every benchmark, a training step"),
}


def add_commands(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark (tables and JSON go to bench/results/)",
        description="Run one benchmark; options after NAME go to it (`kmodel bench NAME --help` lists them). "
        + "; ".join(f"{name}: {text}" for name, (_, text) in BENCHMARKS.items()),
    )
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    p.set_defaults(func=run)


def run(args) -> int:
    module = importlib.import_module(BENCHMARKS[args.name][0])
    return module.main(args.options)
