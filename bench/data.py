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

    marks = {}
    take_step = Trainer.train_step

    def timed_step(self):
        marks.setdefault("first_step", time.perf_counter() - started)
        return take_step(self)

    Trainer.train_step = timed_step
    cfg = load_config(RECIPE, [f"data.prepared={prepared}", "data.sources=[]", "data.heldout=[]", "train.max_steps=3",
                               "train.warmup_steps=0", "train.checkpoint_every=1000", "provenance.ledger=false"])
    train(cfg, run_dir, progress=False)
    return {"startup_seconds": marks["first_step"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-steps", type=int, default=5)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*[int(a) if a.isdigit() else a for a in args.child[1:]])))
        return 0

    load_before = os.getloadavg()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kmodel-bench-data-") as tmp:
        tmp = Path(tmp)
        big, one = synthesise(tmp / f"corpus-x{args.copies}", args.copies), synthesise(tmp / "corpus-x1", 1)
        for workers in (1, 2):
            rows[f"kmodel data prepare, {workers} worker{'s' * (workers > 1)}"] = best(
                "prepare", args.repeats, lambda i, w=workers: (big, tmp / f"prep-{w}-{i}", w))
            rows[f"datasets.map, num_proc {workers}"] = best(
                "datasets_map", args.repeats, lambda i, w=workers: (big, tmp / f"hf-cache-{w}-{i}", w))
        prepared = {"1x": tmp / "prep-x1", f"{args.copies}x": tmp / "prep-1-0"}
        run_child("prepare", one, prepared["1x"], 1)
        startup = {size: best("startup", args.repeats, lambda i, d=d, s=size: (d, tmp / f"run-{s}-{i}"))
                   for size, d in prepared.items()}
        loader = best("loader", args.repeats, lambda i: (prepared["1x"], args.loader_steps))
        corpus_bytes = {size: sum((folder / n).stat().st_size for n in SOURCES) for size, folder in (("1x", one), (f"{args.copies}x", big))}
    load_after = os.getloadavg()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    load = f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (the machine is shared)"
    lines = ["# Data path benchmark (CPU)", "", f"Machine: {machine}; {load}. Best of {args.repeats} runs, each in a fresh process.",
             f"Corpus: the bundled one repeated {args.copies}x with distinct text ({corpus_bytes[f'{args.copies}x'] / 2**20:.1f} MiB); "
             "see bench/data.py.", "", "## Tokenizing the corpus (shipped ko-8k tokenizer)", "",
             "| contender | tokens | seconds | tokens/s | tokens/s per worker |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        workers = 2 if ("2 workers" in name or "num_proc 2" in name) else 1
        extra = f" (map alone {r['map_seconds']:.1f} s)" if "map_seconds" in r else ""
        lines.append(f"| {name} | {r['tokens']:,} | {r['seconds']:.1f}{extra} | {r['tokens'] / r['seconds']:,.0f} | "
                     f"{r['tokens'] / r['seconds'] / workers:,.0f} |")
    lines += ["", "kmodel's time includes hashing the sources, reading JSON, encoding, writing and hashing the shards; "
              "datasets' includes converting the JSON to Arrow and the map.", "",
              "## Loader share of a training step (tiny recipe, 8 x 256 tokens, CPU)", "",
              "| loader seconds per step | step seconds | share |", "|---:|---:|---:|",
              f"| {loader['loader_seconds'] * 1e3:.2f} ms | {loader['step_seconds']:.3f} | {loader['loader_seconds'] / loader['step_seconds']:.2%} |",
              "", "## `kmodel train` on prepared data: start-up and peak memory", "",
              "| corpus | corpus MiB | start-up to first step (s) | peak RSS after 3 steps (MiB) |", "|---|---:|---:|---:|"]
    for size, r in startup.items():
        lines.append(f"| {size} | {corpus_bytes[size] / 2**20:.1f} | {r['startup_seconds']:.2f} | {r['peak_rss_mb']:.0f} |")
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_cpu.md").write_text(table, encoding="utf-8")
    (RESULTS / "data_cpu.json").write_text(json.dumps({"machine": machine, "load": load, "copies": args.copies, "prepare": rows,
                                                        "loader": loader, "startup": startup, "corpus_bytes": corpus_bytes}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
