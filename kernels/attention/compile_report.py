"""Compile the attention kernels for a CUDA target without a GPU and report registers, spills and shared memory.

Triton bundles ptxas, so every autotune config can be compiled for Hopper (sm_90) on any machine. This catches
errors the CPU interpreter does not (it accepts code the compiler rejects) and shows which configs spill,
which is how the CUDA config lists in `triton_impl` were chosen while no GPU was at hand. It measures no speed.

    python -P -m kmodel.kernels.attention.compile_report --head-dim 128 --out bench/results/attention_sm90_compile
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kmodel.kernels.attention import triton_impl, triton_kernels
from kmodel.kernels.triton_support import interpreting

_STAT_POINTERS = {
    "Lse": "*fp32",
    "Delta": "*fp32",
    "DocStart": "*i32",
    "DocEnd": "*i32",
    "CacheLens": "*i64",
    "PartialOut": "*fp32",
    "PartialLse": "*fp32",
    "Sinks": "*fp32",
}
_FLOAT_SCALARS = {"qk_scale", "sm_scale"}


def _signature(kernel, dtype: str, constants: dict) -> tuple[dict, dict]:
    """Triton signature and divisibility hints for `kernel`, typed from its argument names."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        elif name[0].isupper():  # tensors are capitalised
            signature[name] = _STAT_POINTERS.get(name, "*" + dtype)
        else:
            signature[name] = "i32"
        # As when launched: base pointers are 16-byte aligned and strides multiples of 16 elements.
        if signature[name].startswith("*") or name.startswith("stride"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _resources(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        command = [str(tool), "--dump-resource-usage", f.name]
        text = subprocess.run(command, check=False, capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {"registers": int(found.group(1)), "spill_stack_bytes": int(found.group(2))}


def compile_kernel(
    name: str,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    *,
    head_dim: int = 128,
    v_dim: int | None = None,
    dtype: str = "bf16",
    causal: bool = True,
    window: bool = True,
    docs: bool = True,
    sinks: bool = True,
    arch: int = 90,
) -> dict:
    """Compile one kernel config for sm_`arch`; returns its registers, spill stack, shared memory and whether its
    dots became Hopper's asynchronous warpgroup MMA (`wgmma`) rather than `mma.sync`. head_dim, v_dim: the q/k
    and value head dims as launched (v by default head_dim), with their launch constexprs (MLA's 192 as the
    pieces 128 + 64, `triton_impl.qk_pieces`); dims the launch would pad are compiled unmasked at the padded
    size, as a power-of-two shape of that size would run."""
    if interpreting() or not isinstance(triton.language.zeros, triton.runtime.JITFunction):
        raise RuntimeError(
            "compiling needs a process where triton was imported with TRITON_INTERPRET unset (the interpreter's "
            "functions cannot be compiled): run `python -P -m kmodel.kernels.attention.compile_report`"
        )
    kernel = getattr(triton_kernels, name).jit_function(False)
    constants = dict(
        CAUSAL=causal,
        HAS_WINDOW=window,
        HAS_DOCS=docs,
        HAS_SINKS=sinks,
        **triton_impl._dim_meta(head_dim, v_dim or head_dim),
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    if not docs:
        constants.update(DocStart=None, DocEnd=None)
    if not sinks:
        constants.update(Sinks=None)
    constants.update(EVEN_D=True, EVEN_V=True)
    if name == "attention_bwd_delta_kernel":  # launched over the output, whose head dim is v's
        constants.update(HEAD_DIM=constants["V_DIM"])
    constants = {k: v for k, v in constants.items() if k in kernel.arg_names}
    signature, attrs = _signature(kernel, dtype, constants)
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constants.items()}, attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    wgmma = "wgmma.mma_async" in compiled.asm["ptx"]
    return {**_resources(compiled.asm["cubin"]), "shared_bytes": compiled.metadata.shared, "wgmma": wgmma}


def launch_configs(head_dim: int, v_dim: int | None = None) -> list[tuple[str, int, int, int, int]]:
    """(kernel, BLOCK_M, BLOCK_N, num_warps, num_stages) of every config `triton_impl` may launch on CUDA for
    these head dims (v_dim: the value head dim, by default head_dim)."""
    v_dim = v_dim or head_dim
    widths = triton_impl.computed_head_dims(head_dim, v_dim)
    configs = [
        (name, *config) for name in triton_impl._CUDA_CONFIGS for config in triton_impl.cuda_configs(name, *widths)
    ]
    # Fixed launches, at triton's default 3 stages (and 4 warps for delta); delta has no BLOCK_N.
    configs.append(("attention_bwd_delta_kernel", triton_impl.DELTA_BLOCK_M, 0, 4, 3))
    decode_rows = 16  # group x new tokens, padded: one token of a 4:1 GQA group
    decode_block_n = triton_impl.decode_block_n(head_dim, v_dim)
    configs.append(("attention_decode_kernel", decode_rows, decode_block_n, triton_impl.DECODE_NUM_WARPS, 3))
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128, 256], help="q/k head dims to compile")
    parser.add_argument("--v-dim", type=int, help="value head dim if it differs (MLA: --head-dim 192 --v-dim 128)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="q/k/v element type")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (90 = Hopper)")
    parser.add_argument("--first-only", action="store_true", help="only each kernel's first config: a quick check")
    parser.add_argument("--plain", action="store_true", help="compile with causal, window, documents and sinks off")
    parser.add_argument("--out", type=Path, help="also write the table to OUT.md and OUT.json")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    flags = dict.fromkeys(("causal", "window", "docs", "sinks"), not args.plain)

    rows = []
    for head_dim in args.head_dim:
        seen = set()
        v_dim = args.v_dim or head_dim
        for name, block_m, block_n, warps, stages in launch_configs(head_dim, v_dim):
            if args.first_only and name in seen:
                continue
            seen.add(name)
            usage = compile_kernel(
                name, block_m, block_n, warps, stages, head_dim=head_dim, v_dim=v_dim, dtype=args.dtype,
                arch=args.arch, **flags,
            )
            rows.append(dict(kernel=name, head_dim=head_dim, v_dim=v_dim, block_m=block_m, block_n=block_n,
                             num_warps=warps, num_stages=stages, **usage))  # fmt: skip
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)

    features = "no mask features" if args.plain else "causal + window + documents + sinks"
    header = (
        f"Attention kernels compiled for sm_{args.arch}, {args.dtype}, {features}: registers, spills and shared "
        "memory from ptxas, wgmma = the dots compiled to Hopper's warpgroup MMA (else mma.sync); nothing was run "
        "or timed"
    )
    columns = list(rows[0])
    lines = [f"# {header}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        meta = {"arch": args.arch, "dtype": args.dtype, "triton": triton.__version__, "flags": flags, "note": header}
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
