"""`kmodel bench moe`: the routed MoE layer (router + experts), forward and forward+backward.

Implementations compared on the same router logits and expert weights:
    triton      kmodel.kernels.moe.triton_impl: fused router, device-side dispatch, grouped SwiGLU GEMMs
    grouped_mm  reference router and permute, torch's grouped GEMM (F.grouped_mm / torch._grouped_mm), combine
    reference   kmodel.kernels.moe.reference: sort, one matmul pair per expert segment, gather combine
    loop        the common per-expert loop: mask the tokens of each expert, run its MLP, scatter-add back
Reported per row: median time, TFLOP/s of the expert GEMMs (forward 6·M·H·I with M = tokens·top_k,
backward twice that), GB/s of compulsory traffic (weights, x and the output; in the backward also the weights
again, their gradients, d out and d x — a lower bound on real traffic), the CUDA peak memory of one call above
what was allocated before it, and the speed-up over the loop.

`--experts gpt-oss` gives every implementation gpt-oss's expert options (random gate_up / down biases and
clamped_swiglu with alpha 1.702, limit 7) instead of plain SwiGLU experts.

On CUDA the defaults are K-EXAONE-like shapes (128 experts, top-8). Without CUDA the script runs a reduced
CPU mode (tiny shapes; loop, reference and grouped_mm, plus triton on the interpreter when TRITON_INTERPRET=1)
so it is known to work; its table says CPU and is no performance claim.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kmodel.kernels.moe import reference
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

IMPLS = ("triton", "grouped_mm", "reference", "loop")
PRESETS = {
    # name: (hidden, expert intermediate, experts, top_k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),  # the shapes of the published fused-MoE anchors
    "k-exaone-236b": (6144, 2048, 128, 8),  # recipes/k-exaone-236b-a23b.yaml
    "cpu-tiny": (64, 32, 8, 2),  # reduced CPU mode
}
GPU_TOKENS = (8192, 16384, 32768)
CPU_TOKENS = (256,)
MODES = ("forward", "forward+backward")
ROUTER = dict(score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
EXPERT_KINDS = ("swiglu", "gpt-oss")
GPT_OSS_ACTIVATION = dict(activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=7.0)


def _grouped_mm_op() -> Callable | None:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _swiglu(gate_up: torch.Tensor, options: dict) -> torch.Tensor:
    """The expert activation of gate_up (gate columns first), plain or gpt-oss's clamped one (`options`)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if "activation" not in options:
        return F.silu(gate) * up
    return reference.swiglu(gate, up, options["activation"], options["swiglu_alpha"], options["swiglu_limit"])


def _plus(values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return values if bias is None else values + bias


def _layer_triton(x, logits, bias, gate_up_proj, down_proj, top_k, options):
    from kmodel.kernels.moe import triton_impl

    routing = triton_impl.route(logits, bias, top_k=top_k, **ROUTER)
    return triton_impl.moe_experts(x, routing.experts, routing.weights, gate_up_proj, down_proj, **options)


def _layer_reference(x, logits, bias, gate_up_proj, down_proj, top_k, options):
    routing = reference.route(logits, bias, top_k=top_k, **ROUTER)
    return reference.moe_experts(x, routing.experts, routing.weights, gate_up_proj, down_proj, **options)


def _layer_grouped_mm(x, logits, bias, gate_up_proj, down_proj, top_k, options):
    grouped_mm = _grouped_mm_op()
    routing = reference.route(logits, bias, top_k=top_k, **ROUTER)
    x_sorted, order, counts = reference.permute(x, routing.experts, gate_up_proj.shape[0])
    offsets = counts.cumsum(0).to(torch.int32)
    gate_up = grouped_mm(x_sorted, gate_up_proj.transpose(-2, -1), offs=offsets)
    gate_up_bias, down_bias = options.get("gate_up_bias"), options.get("down_bias")
    expert_of_row = torch.sort(routing.experts.flatten()).values if gate_up_bias is not None else None
    hidden = _swiglu(_plus(gate_up, None if gate_up_bias is None else gate_up_bias[expert_of_row]), options)
    y_sorted = grouped_mm(hidden, down_proj.transpose(-2, -1), offs=offsets)
    y_sorted = _plus(y_sorted, None if down_bias is None else down_bias[expert_of_row])
    return reference.combine(y_sorted, order, routing.weights)


def _layer_loop(x, logits, bias, gate_up_proj, down_proj, top_k, options):
    routing = reference.route(logits, bias, top_k=top_k, **ROUTER)
    gate_up_bias, down_bias = options.get("gate_up_bias"), options.get("down_bias")
    out = torch.zeros_like(x)
    for expert in range(gate_up_proj.shape[0]):
        token, slot = torch.where(routing.experts == expert)
        if token.numel() == 0:
            continue
        gate_up = _plus(x[token] @ gate_up_proj[expert].t(), None if gate_up_bias is None else gate_up_bias[expert])
        y = _swiglu(gate_up, options) @ down_proj[expert].t()
        y = _plus(y, None if down_bias is None else down_bias[expert])
        out = out.index_add(0, token, y * routing.weights[token, slot, None].to(y.dtype))
    return out


LAYERS = {"triton": _layer_triton, "grouped_mm": _layer_grouped_mm, "reference": _layer_reference, "loop": _layer_loop}


def _available(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run here, or None."""
    if impl == "triton" and device.type != "cuda" and not interpreting():
        return "Triton kernels need CUDA (on CPU only under TRITON_INTERPRET=1, the slow test interpreter)"
    if impl == "grouped_mm" and _grouped_mm_op() is None:
        return "this torch has neither F.grouped_mm nor torch._grouped_mm"
    return None


def _flops(tokens: int, hidden: int, inter: int, top_k: int, mode: str) -> float:
    forward = 6.0 * tokens * top_k * hidden * inter
    return forward if mode == "forward" else 3.0 * forward


def _compulsory_bytes(tokens: int, hidden: int, inter: int, experts: int, mode: str, itemsize: int) -> float:
    weights = 3.0 * experts * hidden * inter
    forward = weights + 2.0 * tokens * hidden
    total = forward if mode == "forward" else forward + 2.0 * weights + 2.0 * tokens * hidden
    return total * itemsize


def _inputs(tokens, hidden, inter, experts, dtype, device, seed=0, expert_kind="swiglu"):
    """x, router logits, router correction bias, both expert weights and the expert options (`expert_kind`
    gpt-oss: random biases, requiring grad, and the clamped activation; else none)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = draw(tokens, hidden)
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    bias = (torch.randn(experts, generator=gen) * 0.01).to(device)
    gate_up_proj = draw(experts, 2 * inter, hidden, scale=hidden**-0.5)
    down_proj = draw(experts, hidden, inter, scale=inter**-0.5)
    options = {}
    if expert_kind == "gpt-oss":
        options = dict(gate_up_bias=draw(experts, 2 * inter, scale=0.1).requires_grad_(True),
                       down_bias=draw(experts, hidden, scale=0.1).requires_grad_(True), **GPT_OSS_ACTIVATION)
    return x, logits, bias, gate_up_proj, down_proj, options


def _bench_shape(shape_name, shape, tokens, impls, modes, dtype, device, args) -> list[dict]:
    """Rows for one layer shape and token count: every mode x implementation on the same inputs."""
    hidden, inter, experts, top_k = shape
    x, logits, bias, gate_up_proj, down_proj, options = _inputs(
        tokens, hidden, inter, experts, dtype, device, expert_kind=args.experts
    )
    for tensor in (x, logits, gate_up_proj, down_proj):
        tensor.requires_grad_(True)
    rows = []
    for mode in modes:
        group = []
        for impl in impls:
            def call(layer=LAYERS[impl], mode=mode):
                out = layer(x, logits, bias, gate_up_proj, down_proj, top_k, options)
                if mode != "forward":
                    out.backward(torch.ones_like(out))

            result = measure(call, device, warmup=args.warmup, iters=args.iters)
            group.append({
                "shape": shape_name, "hidden": hidden, "inter": inter, "experts": experts, "top_k": top_k,
                "expert_kind": args.experts,
                "tokens": tokens, "mode": mode, "impl": impl, **result,
                "tflops": per_second(_flops(tokens, hidden, inter, top_k, mode) / 1e12, result["ms"]),
                "gbps": per_second(
                    _compulsory_bytes(tokens, hidden, inter, experts, mode, dtype.itemsize) / 1e9, result["ms"]
                ),
            })
        loop_ms = next((row["ms"] for row in group if row["impl"] == "loop"), None)
        for row in group:
            row["vs_loop"] = loop_ms / row["ms"] if loop_ms and row["ms"] else None
        rows += group
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmodel bench moe",
        description="Time the routed MoE layer (router + experts) forward and forward+backward for the Triton "
        "kernels, torch's grouped GEMM, the reference and a per-expert loop; write a markdown table and JSON "
        "named after the device under --out-dir. Without CUDA: a reduced CPU mode that only shows the script works.",
    )
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="layer shape (hidden, expert width, experts, top-k); repeatable. Default: "
                        "qwen3-30b-a3b and k-exaone-236b on CUDA, cpu-tiny on CPU")
    parser.add_argument("--shape", nargs=4, type=int, metavar=("HIDDEN", "INTER", "EXPERTS", "TOP_K"),
                        help="a custom layer shape instead of the presets")
    parser.add_argument("--experts", choices=EXPERT_KINDS, default="swiglu",
                        help="expert MLP: plain SwiGLU (default), or gpt-oss's (gate_up / down biases and "
                        "clamped_swiglu, alpha 1.702, limit 7) for every implementation")
    parser.add_argument("--tokens", nargs="+", type=int,
                        help=f"token counts per call (default {' '.join(map(str, GPU_TOKENS))} on CUDA, "
                        f"{' '.join(map(str, CPU_TOKENS))} on CPU)")
    parser.add_argument("--impl", nargs="+", choices=IMPLS,
                        help="implementations to time (default: every one that runs on the device)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                        help="forward only (a training forward: activations are kept for a backward), "
                        "and/or forward+backward (default both)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"),
                        help="weights and activations (default bf16 on CUDA, fp32 on CPU); routing stays fp32")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3; "
                        "the first Triton calls autotune)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls; the median is reported (default 10)")
    parser.add_argument("--out-dir", default="bench/results",
                        help="where the table and JSON go (default bench/results)")
    parser.add_argument("--name", help="file stem (default moe_<device>, e.g. moe_nvidia_h100_80gb_hbm3 or moe_cpu; "
                        "moe_gpt_oss_<device> with --experts gpt-oss)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if on_gpu else "fp32")]
    if args.shape:
        shapes = {"custom": tuple(args.shape)}
    else:
        names = args.preset or (["qwen3-30b-a3b", "k-exaone-236b"] if on_gpu else ["cpu-tiny"])
        shapes = {name: PRESETS[name] for name in names}
    token_counts = args.tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS)
    impls = args.impl or [impl for impl in IMPLS if _available(impl, device) is None]
    for impl in impls:
        reason = _available(impl, device)
        if reason:
            raise RuntimeError(f"--impl {impl}: {reason}")

    rows = []
    for shape_name, shape in shapes.items():
        for tokens in token_counts:
            rows += _bench_shape(shape_name, shape, tokens, impls, args.mode, dtype, device, args)

    mode_note = "" if on_gpu else (
        "**Reduced CPU mode**: tiny shapes on the CPU, only to show the benchmark runs; not a performance claim."
        + (" Triton rows ran on the Triton interpreter." if "triton" in impls else "")
    )
    notes = [
        f"Device: **{device_name(device)}**, {str(dtype).replace('torch.', '')}, median of {args.iters} calls "
        f"after {args.warmup} warm-up calls. Router: sigmoid + correction bias, top-k renormalised, scaled 2.5. "
        + ("Experts: plain SwiGLU." if args.experts == "swiglu" else
           "Experts: gpt-oss's (gate_up / down biases, clamped_swiglu with alpha 1.702, limit 7)."),
        "TFLOP/s counts the expert GEMMs (6·tokens·k·H·I forward, 3x that forward+backward); GB/s counts "
        "compulsory traffic only (weights, x, output; backward adds weights again, weight gradients, d out, d x); "
        "peak MiB is the CUDA high-water mark of one call above what was allocated before (n/a on CPU).",
    ]
    if mode_note:
        notes.insert(0, mode_note)
    columns = ["shape", "tokens", "mode", "impl", "ms", "tflops", "gbps", "peak_mib", "vs_loop"]
    if any("error" in row for row in rows):
        columns.append("error")
    stem = f"moe_{'gpt_oss_' if args.experts == 'gpt-oss' else ''}{device_slug(device)}"
    write_results(
        args.out_dir, args.name or stem, f"MoE layer benchmark on {device_name(device)}",
        notes, columns, rows, {"benchmark": "moe", "reduced_cpu_mode": not on_gpu, **environment(device, dtype)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
