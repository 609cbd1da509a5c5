"""SentencePiece BPE vs Hugging Face `tokenizers` BPE on a large corpus: speed, peak memory, compression.

    python -P -m kmodel.tokenizer.bench_backends --corpus big.jsonl --heldout DIR/heldout \
        --vocab-size 65536 --sample-chars 50000000 --threads 2 --out bench/results/tokenizer_backends

Each backend trains in a child process (`train_streaming`: one streaming pass over --corpus, the seeded sample,
the learner), so its peak resident memory is the child's own. Throughput is the corpus's bytes over the
child's wall time, and over its CPU time (user + system), which the machine's other users disturb less. Compression is characters per token on every held-out file, grouped by language. The table
records the machine load (`uptime`), since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .evaluate import evaluate, kmodel_encoder
from .stream_train import BACKENDS, train_streaming
from .tokenizer import Tokenizer


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def run_backend(backend: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """Train with `backend` in a child process; returns wall seconds, peak RSS and the child's timings."""
    command = [
        sys.executable, "-P", "-m", "kmodel.tokenizer.bench_backends", "--child", backend,
        "--corpus", str(args.corpus), "--vocab-size", str(args.vocab_size), "--mix", args.mix,
        "--sample-chars", str(args.sample_chars), "--threads", str(args.threads), "--out", str(out_dir),
    ]  # fmt: skip
    environment = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    load_before = _uptime()
    started = time.perf_counter()
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{backend} training failed:\n{result.stderr[-3000:]}")
    child = json.loads(result.stdout.strip().splitlines()[-1])
    corpus_bytes = Path(args.corpus).stat().st_size
    return {
        "backend": backend,
        "wall_seconds": round(wall, 1),
        "corpus_mb_per_second": round(corpus_bytes / 1e6 / wall, 2),
        "peak_rss_mb": round(child["peak_rss_kb"] / 1024, 1),
        "cpu_seconds": round(child["cpu_seconds"], 1),
        "corpus_mb_per_cpu_second": round(corpus_bytes / 1e6 / child["cpu_seconds"], 2),
        **child["timing"],
        "load_before": load_before,
        "load_after": _uptime(),
    }


def compression(tokenizer_dir: Path, heldout: list[Path]) -> dict:
    rows = evaluate([kmodel_encoder(Tokenizer.load(tokenizer_dir))], heldout)["rows"]
    per_lang: dict[str, list[int]] = {}
    for row in rows:
        if row["file"] != "(all files)":
            totals = per_lang.setdefault(row["lang"], [0, 0])
            totals[0] += row["characters"]
            totals[1] += row["tokens"]
    return {lang: characters / tokens for lang, (characters, tokens) in sorted(per_lang.items())}


def markdown(report: dict) -> str:
    langs = sorted({lang for row in report["rows"] for lang in row["chars_per_token"]})
    header = ["backend", "wall s", "corpus MB/s", "CPU s", "corpus MB/CPU s", "peak RSS MB", "sampling s", "learning s"]
    header += [f"{lang} chars/token" for lang in langs]
    summary = (
        f"Corpus {report['corpus']} ({report['corpus_bytes'] / 1e9:.2f} GB), sample {report['sample_chars']:,} "
        f"characters, vocabulary {report['vocab_size']:,}, {report['threads']} threads, mix {report['mix']}."
    )
    lines = [
        summary,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in report["rows"]:
        cells = [row["backend"], f"{row['wall_seconds']:.0f}", f"{row['corpus_mb_per_second']:.2f}",
                 f"{row['cpu_seconds']:.0f}", f"{row['corpus_mb_per_cpu_second']:.2f}",
                 f"{row['peak_rss_mb']:,.0f}", f"{row['sampling_seconds']:.0f}", f"{row['learning_seconds']:.0f}"]  # fmt: skip
        cells += [f"{row['chars_per_token'][lang]:.3f}" for lang in langs]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {row['backend']}: load before `{row['load_before']}`, after `{row['load_after']}`" for row in report["rows"]]
    lines.append(f"- held-out files: {', '.join(report['heldout'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--heldout", type=Path, help="directory of held-out *.jsonl files")
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--mix", default="ko=0.6,en=0.25,code=0.15")
    parser.add_argument("--sample-chars", type=int, default=50_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path, required=True, help="PREFIX for .md/.json, or the child's tokenizer dir")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        tok = train_streaming(
            args.out, [args.corpus], vocab_size=args.vocab_size, mix=args.mix, backend=args.child,
            sample_chars=args.sample_chars, num_threads=args.threads,
        )  # fmt: skip
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to the other users of the machine
        print(json.dumps({"peak_rss_kb": usage.ru_maxrss, "cpu_seconds": cpu, "timing": tok.metadata["timing"]}))
        return 0

    if args.heldout is None:
        parser.error("--heldout is required")
    heldout = sorted(args.heldout.glob("*.jsonl"))
    report = {
        "corpus": str(args.corpus), "corpus_bytes": args.corpus.stat().st_size, "sample_chars": args.sample_chars,
        "vocab_size": args.vocab_size, "threads": args.threads, "mix": args.mix,
        "heldout": [path.name for path in heldout], "rows": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kmodel-bench-") as scratch:
        for backend in args.backends.split(","):
            row = run_backend(backend, args, Path(scratch) / backend)
            print(json.dumps(row), file=sys.stderr)
            row["chars_per_token"] = compression(Path(scratch) / backend, heldout)
            report["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    Path(f"{args.out}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
