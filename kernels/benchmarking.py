"""Timing, memory and result-table helpers shared by the kernel benchmarks (`kmodel bench moe`, `... ops`).

Times are medians over timed repeats after warm-up (CUDA events on GPU, perf_counter on CPU). Peak memory
is the CUDA allocator's high-water mark during one call above what was allocated before it (None on CPU,
where torch keeps no such statistic). Results are written as a markdown table and a JSON file whose names
and contents carry the device, so a table measured on one machine is never mistaken for another's.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def pick_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    return device


def device_name(device: torch.device) -> str:
    """Human-readable device: the GPU's name, or the CPU (with its core count) for reduced CPU runs."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: `cpu`, or the GPU name lower-cased (e.g. nvidia_h100_80gb_hbm3)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated at the high-water mark of one fn() call beyond those held before it (CUDA only)."""
    if device.type != "cuda":
        return None
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> dict:
    """{"ms": median time, "peak_mib": peak memory} of fn(), or {"ms": None, ..., "error": ...} when the call
    runs out of memory (a baseline that cannot hold the shape is a result too)."""
    try:
        ms = time_ms(fn, device, warmup=warmup, iters=iters)
        peak = peak_memory_bytes(fn, device)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"ms": None, "peak_mib": None, "error": "out of memory"}
    return {"ms": ms, "peak_mib": None if peak is None else peak / 2**20}


def per_second(amount: float, ms: float | None) -> float | None:
    """amount / time, for throughput columns (None when the call did not run)."""
    return None if ms is None else amount / (ms * 1e-3)


def format_cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    out_dir: str | Path, stem: str, title: str, notes: Sequence[str], columns: Sequence[str], rows: Sequence[dict],
    meta: dict,
) -> tuple[Path, Path]:
    """Print the table and write `<stem>.md` and `<stem>.json` under out_dir; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(columns, rows)
    markdown = "\n\n".join([f"# {title}", *notes, table]) + "\n"
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md_path.write_text(markdown)
    payload = {"title": title, **meta, "columns": list(columns), "rows": list(rows)}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown)
    print(f"wrote {md_path} and {json_path}")
    return md_path, json_path


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """What a result depends on besides the shapes: device, dtype and library versions."""
    info = {"device": device_name(device), "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info
