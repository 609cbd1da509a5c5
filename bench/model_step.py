"""Benchmark: one forward+backward training step of a recipe's model, kmodel vs transformers.

A script of the repository, not of the installed package: transformers is only a baseline (and a test
dependency), and the `kmodel` package never imports another project's model code.

The same weights (exported through `kmodel export hf`), the same batch and the same loss (next-token
cross-entropy; MTP and auxiliary losses off on both sides, as transformers' classes compute neither).
Each contender runs in a fresh process so its peak resident memory is its own. Writes a markdown table
and JSON under bench/results/ naming the device.

    python bench/model_step.py [--recipe R] [--batch B] [--seq S] [--repeats N]   (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kmodel.safe_path import python_command

FAIR = ["model.num_nextn_predict_layers=0", "model.aux_loss_coef=0", "model.router_z_loss_coef=0", "model.logits_z_loss_coef=0",
        "model.router_bias_update_rate=0"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/model_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/tiny-ko-moe.yaml", help="recipe whose model is timed")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per contender (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="bench/results", help="directory for model_step_<device>.md/.json")
    p.add_argument("--contender", choices=["kmodel", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return p


def _time_contender(args) -> dict:
    """Runs inside the child process: build one contender, time its steps, report JSON on stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.contender == "kmodel":
        from kmodel.checkpoint import load_model

        model = load_model(args.checkpoint, kernels={op: "torch" for op in ("attention", "moe", "norm", "loss")})

        def step(ids):
            return model(ids, ids).loss
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            Path(args.checkpoint) / "hf", dtype=torch.float32, attn_implementation="sdpa"
        )

        def step(ids):
            # transformers shifts labels itself; feed one extra token so both sides see batch*seq targets.
            return model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss

    model.train()
    vocab = model.cfg.vocab_size if args.contender == "kmodel" else model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq + (1 if args.contender == "transformers" else 0)))
    times = []
    for i in range(args.warmup + args.repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step(ids).backward()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_rss_mib": peak_mib}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.contender:
        print(json.dumps(_time_contender(args)))
        return 0
    from kmodel.checkpoint import save_checkpoint
    from kmodel.config import load_config
    from kmodel.export.hf import export_hf
    from kmodel.model import build_model

    cfg = load_config(args.recipe, FAIR)
    load_before = os.getloadavg()[0]  # other jobs on the machine skew CPU timings: the table says how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ckpt", build_model(cfg), cfg)
        family = export_hf(Path(tmp) / "ckpt", Path(tmp) / "ckpt" / "hf")
        results = {}
        for contender in ("kmodel", "transformers"):
            cmd = [*python_command(str(Path(__file__).resolve())), "--contender", contender, "--checkpoint",
                   str(Path(tmp) / "ckpt"), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[contender] = json.loads(done.stdout.strip().splitlines()[-1])

    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    tokens = args.batch * args.seq
    ours, theirs = results["kmodel"], results["transformers"]
    rows = [
        ("kmodel (torch reference kernels)", ours),
        (f"transformers {family} (sdpa)", theirs),
    ]
    lines = [
        f"# Training step: {cfg.name} forward+backward, batch {args.batch} x {args.seq} tokens",
        "",
        f"Device: {device}; torch {torch.__version__}; median of {args.repeats} steps after {args.warmup} warm-up; "
        f"load average {load_before:.2f} before the run ({time.strftime('%Y-%m-%d')}).",
        "Same weights (exported through `kmodel export hf`), same batch, next-token cross-entropy only on both sides "
        "(MTP, balance, router and logit z-losses off: transformers computes none of them).",
        "",
        "| implementation | median step (s) | tokens/s | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['median_s']:.3f} | {tokens / r['median_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    lines += [
        "",
        f"kmodel / transformers: time x{ours['median_s'] / theirs['median_s']:.2f}, "
        f"peak memory x{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f} (below 1 means kmodel is faster / leaner).",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "model_step_cpu"
    stem.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    record = {"device": device, "recipe": args.recipe, "batch": args.batch, "seq": args.seq, "results": results}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
