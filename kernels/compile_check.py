"""Compile every Triton kernel of every op for a CUDA target on a machine without a GPU: the one compile check.

Triton bundles ptxas, so every kernel variant the code launches (each epilogue / gather / flag combination,
with every GPU autotune config) can be compiled for Hopper anywhere. This catches what the CPU interpreter
lets through — code the GPU compiler rejects, tiles that spill registers — and it is how the autotune lists
were chosen while no GPU was at hand. It runs no kernel and measures no speed. Attention's variants are its
launch configs per head dims (64, 128, 256, and MLA's 192 / 128, q/k split 128 + 64) with every mask
feature on, compiled by `attention.compile_report` (which also writes the per-config register/shared-memory/wgmma
tables).

    python -P -m kmodel.kernels.compile_check [--ops attention moe norm loss] [--arch 90] [--dtype bf16]
                                           [--first-config-only]

Exit status 1 when a variant fails to compile or spills registers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

_FP32_POINTERS = {  # buffers that are fp32 whatever the compute dtype
    "rstd_ptr", "grad_weight_partial_ptr", "row_max_ptr", "row_sum_ptr", "target_logit_ptr", "lse_ptr",
    "coef_softmax_ptr", "coef_target_ptr", "scores_ptr", "weights_ptr", "grad_weights_ptr", "grad_scores_ptr",
    "grad_logits_ptr", "routing_weights_ptr", "weight_grad_ptr", "bias_ptr",
}
_INT64_POINTERS = {"experts_ptr", "targets_ptr", "counts_ptr"}
_INT32_POINTERS = {"block_counts_ptr", "block_first_row_ptr", "order_ptr", "row_assignment_ptr", "tiles_ptr",
                   "segments_ptr"}
_FP32_SCALARS = {"eps", "routed_scaling_factor", "swiglu_alpha", "swiglu_limit"}
_ALIGNED_SCALARS = {"N", "K", "P", "Q", "hidden"}  # and every stride: multiples of 16 in the launches that matter


OPS = ("attention", "moe", "norm", "loss")
ATTENTION_DIMS = ((64, 64), (128, 128), (256, 256), (192, 128))  # (q/k, v) head dims; the last is MLA's (128 + 64)


class Variant(NamedTuple):
    name: str
    kernel: object  # a LazyKernel; for attention, the launch config (kernel name, BLOCK_M, BLOCK_N, q/k, v dims)
    constants: dict  # constexpr arguments
    num_warps: int
    num_stages: int = 3
    fp32_pointers: frozenset = frozenset()  # per-kernel additions to _FP32_POINTERS
    op: str = "moe"


def _attention_variants(first_config_only: bool) -> list[Variant]:
    from kmodel.kernels.attention import compile_report

    variants = []
    for head_dim, v_dim in ATTENTION_DIMS:
        seen = set()
        for name, block_m, block_n, warps, stages in compile_report.launch_configs(head_dim, v_dim):
            if first_config_only and name in seen:
                continue
            seen.add(name)
            label = f"attention {name} hd{head_dim}/{v_dim} ({block_m}, {block_n}) w{warps} s{stages}"
            variants.append(Variant(label, (name, block_m, block_n, head_dim, v_dim), {}, warps, stages,
                                    op="attention"))
    return variants


def _variants(first_config_only: bool, ops: tuple[str, ...] = OPS) -> list[Variant]:
    variants = [variant for variant in _kernel_variants(first_config_only) if variant.op in ops]
    return variants + (_attention_variants(first_config_only) if "attention" in ops else [])


def _kernel_variants(first_config_only: bool) -> list[Variant]:
    from kmodel.kernels.loss import triton_impl as loss
    from kmodel.kernels.moe import triton_impl as moe
    from kmodel.kernels.norm import triton_impl as norm

    def tuned(kernel):
        configs = kernel.configs[:1] if first_config_only else kernel.configs
        return [(config.kwargs, config.num_warps, config.num_stages) for config in configs]

    variants = [
        Variant("rms_norm forward", norm._rms_norm_forward_kernel, dict(BLOCK_ROWS=1, BLOCK_H=8192), 16, op="norm"),
        Variant("rms_norm backward", norm._rms_norm_backward_kernel,
                dict(COMPUTE_GRAD_WEIGHT=True, BLOCK_ROWS=1, BLOCK_H=8192), 16, op="norm"),
        Variant("loss lse chunk", loss._lse_chunk_kernel, dict(BLOCK_ROWS=1, BLOCK_V=4096), 8, op="loss"),
        Variant("loss logits grad", loss._logits_grad_kernel, dict(BLOCK_ROWS=1, BLOCK_V=4096), 8, op="loss"),
        Variant("moe dispatch histogram", moe._dispatch_histogram_kernel, dict(BLOCK_A=128, BLOCK_E=256), 4),
        Variant("moe dispatch positions", moe._dispatch_positions_kernel, dict(BLOCK_A=128), 4),
        Variant("moe tile table", moe._tile_table_kernel, dict(BLOCK_M=64, BLOCK_E=256, BLOCK_TILES=32), 4),
        Variant("moe combine", moe._gather_sum_kernel, dict(TOP_K=8, WEIGHTED=True, BLOCK_T=1, BLOCK_H=1024), 4),
        Variant("moe combine backward", moe._combine_backward_kernel, dict(TOP_K=8, BLOCK_T=1, BLOCK_H=1024), 4),
    ]
    for softmax, n_group, topk_group in ((False, 1, 1), (True, 1, 1), (False, 8, 4)):
        constants = dict(TOP_K=8, N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_SIZE=128 // n_group,
                         SOFTMAX=softmax, HAS_BIAS=True, NORMALIZE=True, BLOCK_T=moe._route_block_t(128),
                         BLOCK_E=128, BLOCK_K=8, BLOCK_G=n_group)
        variants.append(Variant(f"moe route softmax={softmax} groups={n_group}", moe._route_kernel, constants, 4,
                                fp32_pointers=frozenset({"logits_ptr"})))
    variants.append(Variant("moe route backward", moe._route_backward_kernel,
                            dict(TOP_K=8, SOFTMAX=False, NORMALIZE=True, HAS_GRAD_WEIGHTS=True, HAS_GRAD_SCORES=True,
                                 BLOCK_T=moe._route_block_t(128), BLOCK_E=128, BLOCK_K=8), 4))
    # The grouped-GEMM variants the MoE functions launch: (epilogue, gather A, scale rows, expert bias, clamped
    # activation), plain SwiGLU experts first, then gpt-oss's (biases and clamped_swiglu).
    for epilogue, gather, scale, bias, clamped in (
        (moe._SWIGLU_FORWARD, True, False, False, False), (moe._SWIGLU_FORWARD, False, False, False, False),
        (moe._PLAIN, False, False, False, False), (moe._SWIGLU_BACKWARD, True, True, False, False),
        (moe._SWIGLU_BACKWARD, False, False, False, False),
        (moe._SWIGLU_FORWARD, True, False, True, True), (moe._SWIGLU_FORWARD, False, False, True, True),
        (moe._PLAIN, False, False, True, False), (moe._SWIGLU_BACKWARD, True, True, True, True),
        (moe._SWIGLU_BACKWARD, False, False, False, True),
    ):
        for meta, warps, stages in tuned(moe._grouped_mm_kernel):
            constants = dict(EPILOGUE=epilogue, GATHER_A=gather, SCALE_ROWS=scale, HAS_BIAS=bias, CLAMPED=clamped,
                             DOT_PRECISION="tf32", PARTIAL_BLOCK_N=moe._narrowest_block_n(), BLOCK_M=64, **meta)
            name = (f"moe grouped mm epilogue={epilogue} gather={gather} scale={scale} bias={bias} "
                    f"clamped={clamped} {meta} w{warps} s{stages}")
            variants.append(Variant(name, moe._grouped_mm_kernel, constants, warps, stages))
    # Weight gradients: (gather grad, input rows, bias gradient, clamped activation).
    for gather_grad, input_mode, bias_grad, clamped in (
        (False, moe._INPUT_TOKENS, False, False), (True, moe._INPUT_SWIGLU, False, False),
        (False, moe._INPUT_ROWS, False, False), (False, moe._INPUT_SWIGLU, False, False),
        (False, moe._INPUT_TOKENS, True, False), (True, moe._INPUT_SWIGLU, True, True),
        (False, moe._INPUT_ROWS, True, False), (False, moe._INPUT_SWIGLU, True, True),
    ):
        for meta, warps, stages in tuned(moe._grouped_weight_grad_kernel):
            constants = dict(GATHER_GRAD=gather_grad, INPUT_MODE=input_mode, BIAS_GRAD=bias_grad, CLAMPED=clamped,
                             DOT_PRECISION="tf32", **meta)
            name = (f"moe weight grad gather={gather_grad} input={input_mode} bias={bias_grad} clamped={clamped} "
                    f"{meta} w{warps} s{stages}")
            variants.append(Variant(name, moe._grouped_weight_grad_kernel, constants, warps, stages))
    return variants


def _signature(arg_names, constants, dtype, fp32_pointers):
    signature, attrs = {}, {}
    for index, name in enumerate(arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in _INT64_POINTERS:
                signature[name] = "*i64"
            elif name in _INT32_POINTERS:
                signature[name] = "*i32"
            else:
                signature[name] = "*fp32" if name in _FP32_POINTERS | fp32_pointers else f"*{dtype}"
        else:
            signature[name] = "fp32" if name in _FP32_SCALARS else "i32"
        aligned = name.endswith("_ptr") or name.startswith("stride") or name in _ALIGNED_SCALARS
        if aligned and name not in constants:
            attrs[(index,)] = [["tt.divisibility", 16]]  # as Triton specialises 16-aligned launch arguments
    return signature, attrs


def _registers_and_spills(cubin: bytes) -> tuple[int, int]:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([str(cuobjdump), "--dump-resource-usage", handle.name], capture_output=True,
                                text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"cuobjdump reported no resource usage:\n{report}")
    return int(found.group(1)), int(found.group(2))


def compile_variant(variant: Variant, *, arch: int, dtype: str) -> dict:
    """Registers, spill-stack bytes and shared memory of one variant compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if variant.op == "attention":
        from kmodel.kernels.attention import compile_report

        name, block_m, block_n, head_dim, v_dim = variant.kernel
        usage = compile_report.compile_kernel(name, block_m, block_n, variant.num_warps, variant.num_stages,
                                              head_dim=head_dim, v_dim=v_dim, dtype=dtype, arch=arch)
        return {"registers": usage["registers"], "spill_bytes": usage["spill_stack_bytes"],
                "shared_bytes": usage["shared_bytes"], "wgmma": usage["wgmma"]}

    kernel = variant.kernel.jit_function(False)
    signature, attrs = _signature(kernel.arg_names, variant.constants, dtype, variant.fp32_pointers)
    constexprs = {(kernel.arg_names.index(name),): value for name, value in variant.constants.items()}
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
    registers, spill = _registers_and_spills(compiled.asm["cubin"])
    return {"registers": registers, "spill_bytes": spill, "shared_bytes": compiled.metadata.shared}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -P -m kmodel.kernels.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to compile (default all)")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (default 90, Hopper)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="compute dtype (default bf16)")
    parser.add_argument("--first-config-only", action="store_true",
                        help="compile only the first autotune config of each autotuned kernel variant")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check needs TRITON_INTERPRET unset: the interpreter compiles nothing")
    failed = 0
    for variant in _variants(args.first_config_only, tuple(args.ops)):
        try:
            usage = compile_variant(variant, arch=args.arch, dtype=args.dtype)
        except Exception as error:  # report every failing variant, not just the first
            failed += 1
            print(f"FAILED {variant.name}: {type(error).__name__}: {error}", flush=True)
            continue
        spills = usage["spill_bytes"] > 0
        failed += spills
        print(f"{'SPILLS' if spills else 'ok    '} {variant.name}: {usage}", flush=True)
    print(f"{failed} variant(s) failed or spilled" if failed else "every variant compiled without spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
