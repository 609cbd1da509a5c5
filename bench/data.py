"""Benchmark of the data path: prepare throughput, loader share of a training step, start-up and peak RSS.

A script of the repository (it compares against `datasets.map`, which kmodel itself never uses for this).
The bundled corpus (data/corpus/train, 1.5 MB) is too small to time a prepare, so `--copies N` synthesises
an N-times corpus by repetition: copy k of every document is prefixed with "[copy k]" and the documents of
each copy are rotated, so no two documents are identical (the token statistics are the bundled corpus's).

    python -P bench/data.py [--copies 20] [--repeats 3]   (from the repository root; writes bench/results/data_cpu.*)

  prepare   `kmodel data prepare` with 1 and 2 workers, and `datasets.map` (batched, the same tokenizer and
            the same encode call, num_proc 1 and 2) on the N-times corpus; tokens/s, best of --repeats.
  loader    the tiny recipe on CPU: seconds per step spent in `next_micro_batch` (index, memory-mapped reads,
            packing) against the whole step.
  start-up  `kmodel train` on data prepared from the 1x and the N-times corpus, each in a fresh process: seconds
            from process start to the first step, and peak resident memory after 3 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kmodel.safe_path import python_command

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-ko-moe.yaml"
RESULTS = REPO / "bench" / "results"
SOURCES = ("ko_libreoffice_help.jsonl", "en_python_docs.jsonl", "code_python_stdlib.jsonl")


def synthesise(out: Path, copies: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        lines = (REPO / "data/corpus/train" / name).read_text(encoding="utf-8").rstrip("\n").split("\n")
        with open(out / name, "w", encoding="utf-8") as f:
            for k in range(copies):
                rotated = lines[k % len(lines):] + lines[: k % len(lines)]
                for line in rotated:
                    record = json.loads(line)
                    record["text"] = f"[copy {k}] {record['text']}" if copies > 1 else record["text"]
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def sources_override(folder: Path) -> str:
    weights = {"ko_libreoffice_help.jsonl": 0.6, "en_python_docs.jsonl": 0.25, "code_python_stdlib.jsonl": 0.15}
    names = {"ko_libreoffice_help.jsonl": "ko", "en_python_docs.jsonl": "en", "code_python_stdlib.jsonl": "code"}
    return "data.sources=[" + ", ".join(f"{{name: {names[n]}, path: {folder / n}, weight: {weights[n]}}}" for n in SOURCES) + "]"


# --- children (each timed in a fresh process) -------------------------------------------------------------------
def child_prepare(folder: str, out: str, workers: int) -> dict:
    from kmodel.config import load_config
    from kmodel.data import prepare

    cfg = load_config(RECIPE, [sources_override(Path(folder))])
    start = time.perf_counter()
    prepared = prepare(cfg.data, out, workers=workers, part_bytes=2 << 20, progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(s["tokens"] for src in prepared.sources for s in src["shards"])
    return {"seconds": seconds, "tokens": tokens}


def child_datasets_map(folder: str, cache: str, workers: int) -> dict:
    import datasets

    from kmodel.data import load_tokenizer

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer("shipped")
    files = [str(Path(folder) / n) for n in SOURCES]
    start = time.perf_counter()
    rows = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
    loaded = time.perf_counter()

    def encode(batch):
        return {"input_ids": tokenizer.encode_batch(batch["text"], add_eos=True, num_threads=1)}

    mapped = rows.map(encode, batched=True, batch_size=1000, num_proc=workers if workers > 1 else None,
                      remove_columns=rows.column_names)
    end = time.perf_counter()
    tokens = sum(len(ids) for ids in mapped["input_ids"])
    return {"seconds": end - start, "map_seconds": end - loaded, "tokens": tokens}


def child_startup(prepared: str, run_dir: str) -> dict:
    started = time.perf_counter()
    from kmodel.config import load_config
    from kmodel.train import Trainer, train
    from kmodel.train import trainer as trainer_module

    marks = {}
    take_step = Trainer.train_step

    def timed_step(self):
        marks.setdefault("first_step", time.perf_counter() - started)
        return take_step(self)

    Trainer.train_step = timed_step
    marks["data_seconds"] = 0.0
    for name in ("data_manifest", "training_mixture"):
        original = getattr(trainer_module, name)

        def timed(*args, original=original, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                marks["data_seconds"] += time.perf_counter() - start

        setattr(trainer_module, name, timed)
    cfg = load_config(RECIPE, [f"data.prepared={prepared}", "data.sources=[]", "data.heldout=[]", "train.max_steps=3",
                               "train.warmup_steps=0", "train.checkpoint_every=1000", "provenance.ledger=false"])
    train(cfg, run_dir, progress=False)
    return {"startup_seconds": marks["first_step"], "data_seconds": marks["data_seconds"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_loader(prepared: str, steps: int) -> dict:
    from kmodel.config import load_config
    from kmodel.train import Trainer

    cfg = load_config(RECIPE, [f"data.prepared={prepared}", "data.sources=[]", "data.heldout=[]", "provenance.ledger=false"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        loader = []
        fetch = trainer.next_micro_batch

        def timed_fetch():
            start = time.perf_counter()
            batch = fetch()
            loader.append(time.perf_counter() - start)
            return batch

        trainer.next_micro_batch = timed_fetch
        trainer.train_step()  # warm-up
        loader.clear()
        step_seconds = [trainer.train_step()["step_seconds"] for _ in range(steps)]
    return {"loader_seconds": sum(loader) / steps, "step_seconds": sum(step_seconds) / steps}


CHILDREN = {"prepare": child_prepare, "datasets_map": child_datasets_map, "startup": child_startup, "loader": child_loader}


def run_child(name: str, *args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*python_command(__file__), "--child", name, *map(str, args)], capture_output=True, text=True,
                            env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def best(name: str, repeats: int, make_args) -> dict:
    runs = [run_child(name, *make_args(i)) for i in range(repeats)]
    return min(runs, key=lambda r: r.get("seconds", r.get("startup_seconds", r.get("step_seconds"))))


def measure(parts: set[str], copies: int, repeats: int, loader_steps: int) -> dict[str, dict]:
    """Each part's numbers, with the machine load while it ran."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kmodel-bench-data-") as tmp:
        tmp = Path(tmp)
        big, one = synthesise(tmp / f"corpus-x{copies}", copies), synthesise(tmp / "corpus-x1", 1)
        corpus_mib = {size: sum((folder / n).stat().st_size for n in SOURCES) / 2**20
                      for size, folder in (("1x", one), (f"{copies}x", big))}
        if "prepare" in parts:
            load, rows = os.getloadavg()[0], {}
            for workers in (1, 2):
                rows[f"kmodel data prepare, {workers} worker{'s' * (workers > 1)}"] = {"workers": workers, **best(
                    "prepare", repeats, lambda i, w=workers: (big, tmp / f"prep-{w}-{i}", w))}
                rows[f"datasets.map, num_proc {workers}"] = {"workers": workers, **best(
                    "datasets_map", repeats, lambda i, w=workers: (big, tmp / f"hf-cache-{w}-{i}", w))}
            results["prepare"] = {"rows": rows, "corpus_mib": corpus_mib[f"{copies}x"], "copies": copies,
                                  "load": [load, os.getloadavg()[0]], "repeats": repeats}
        prepared = {"1x": tmp / "prepared-x1", f"{copies}x": tmp / f"prepared-x{copies}"}
        run_child("prepare", one, prepared["1x"], 1)
        if "startup" in parts:
            run_child("prepare", big, prepared[f"{copies}x"], 2)
        if "loader" in parts:
            load = os.getloadavg()[0]
            loader = best("loader", repeats, lambda i: (prepared["1x"], loader_steps))
            results["loader"] = {**loader, "load": [load, os.getloadavg()[0]], "repeats": repeats}
        if "startup" in parts:
            load = os.getloadavg()[0]
            runs: dict[str, list[dict]] = {size: [] for size in prepared}
            for i in range(repeats):  # alternate the sizes, so both see the same load
                for size, directory in prepared.items():
                    runs[size].append(run_child("startup", directory, tmp / f"run-{size}-{i}"))
            startup = {size: {"corpus_mib": corpus_mib[size],
                              **{k: min(r[k] for r in rs) for k in ("startup_seconds", "data_seconds", "peak_rss_mb")}}
                       for size, rs in runs.items()}
            results["startup"] = {"rows": startup, "load": [load, os.getloadavg()[0]], "repeats": repeats}
    return results


def render(results: dict, machine: str) -> str:
    def load(part):
        before, after = results[part]["load"]
        return f"load average {before:.1f} before, {after:.1f} after; best of {results[part]['repeats']}"

    lines = ["# Data path benchmark (CPU)", "", f"Machine: {machine}, shared with other jobs (load stated per table). "
             "Every run in a fresh process; see bench/data.py.", ""]
    if "prepare" in results:
        p = results["prepare"]
        lines += [f"## Tokenizing a {p['copies']}x corpus ({p['corpus_mib']:.1f} MiB, shipped ko-8k tokenizer)", "",
                  f"{load('prepare')}. kmodel's time includes hashing the sources, reading JSON, encoding, writing and "
                  "hashing the shards; datasets' includes converting the JSON to Arrow and the map.", "",
                  "| contender | tokens | seconds | tokens/s | tokens/s per worker |", "|---|---:|---:|---:|---:|"]
        for name, r in p["rows"].items():
            extra = f" (map alone {r['map_seconds']:.1f})" if "map_seconds" in r else ""
            lines.append(f"| {name} | {r['tokens']:,} | {r['seconds']:.1f}{extra} | {r['tokens'] / r['seconds']:,.0f} | "
                         f"{r['tokens'] / r['seconds'] / r['workers']:,.0f} |")
        lines.append("")
    if "loader" in results:
        r = results["loader"]
        lines += ["## Loader share of a training step (tiny recipe, 8 x 256 tokens, CPU)", "", f"{load('loader')}.", "",
                  "| loader per step | step | share |", "|---:|---:|---:|",
                  f"| {r['loader_seconds'] * 1e3:.2f} ms | {r['step_seconds']:.3f} s | "
                  f"{r['loader_seconds'] / r['step_seconds']:.2%} |", ""]
    if "startup" in results:
        lines += ["## `kmodel train` on prepared data: start-up and peak memory", "",
                  f"{load('startup')}, the sizes alternating. Start-up: process start to the first step; data set-up: "
                  "the data manifest and the row order (the part that could grow with the corpus).", "",
                  "| corpus | MiB | start-up (s) | data set-up (s) | peak RSS after 3 steps (MiB) |", "|---|---:|---:|---:|---:|"]
        for size, r in results["startup"]["rows"].items():
            lines.append(f"| {size} | {r['corpus_mib']:.1f} | {r['startup_seconds']:.2f} | {r['data_seconds']:.3f} | "
                         f"{r['peak_rss_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-steps", type=int, default=5)
    parser.add_argument("--parts", default="prepare,loader,startup",
                        help="which measurements to (re)run; the others are kept from bench/results/data_cpu.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*[int(a) if a.isdigit() else a for a in args.child[1:]])))
        return 0

    saved = RESULTS / "data_cpu.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    results.update(measure(set(args.parts.split(",")), args.copies, args.repeats, args.loader_steps))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    table = render(results, machine)
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=1))
    (RESULTS / "data_cpu.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
