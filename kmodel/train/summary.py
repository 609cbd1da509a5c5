"""The short human summary printed and saved (DIR/summary.txt) at the end of a run."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from kmodel.checkpoint import list_checkpoints
from kmodel.rundir import CHECKPOINTS_DIR, METRICS_FILE, PLOTS_DIR, SUMMARY_FILE
from kmodel.train.memory import CATEGORIES, record_key
from kmodel.train.metrics import read_metrics


def _mean_of(records, key, count):
    values = [r[key] for r in records[:count] if isinstance(r.get(key), float) and math.isfinite(r[key])]
    return statistics.fmean(values) if values else float("nan")


def summarize(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train:
        return f"run {run_dir}: no training steps logged"
    last = train[-1]
    window = max(1, min(10, len(train) // 4))  # first and last windows never overlap
    lines = [
        f"run directory  {run_dir}",
        f"steps          {last['step']} ({last['tokens']:,} tokens), {sum(r['skipped'] for r in train)} skipped",
        f"LM loss        {_mean_of(train, 'lm_loss', window):.3f} (first {window} logged steps) -> "
        f"{_mean_of(train[::-1], 'lm_loss', window):.3f} (last {window})",
        f"throughput     {statistics.median(r['tokens_per_s'] for r in train):,.0f} tokens/s (median), "
        f"{sum(r['step_seconds'] for r in train):.0f} s in steps",
    ]
    mfu = [r["mfu"] for r in train if r.get("mfu") is not None]
    if mfu:
        lines.append(f"MFU            {100 * statistics.median(mfu):.1f}% (median)")
    memory = [r for r in records if r["kind"] == "memory"]
    if memory:  # the largest value over the ranks, per category, as the planner predicts it (kmodel plan)
        step = max(r["step"] for r in memory)
        ranks = [r for r in memory if r["step"] == step]
        parts = ", ".join(f"{c} {max(r[record_key(c)] for r in ranks) / 2**20:,.1f}" for c in CATEGORIES)
        lines.append(f"memory         {parts} MiB (largest of {len(ranks)} rank(s), step {step})")
    if evals:
        e = evals[-1]
        lines.append(f"held-out       loss {e['loss']:.3f}, perplexity {e['perplexity']:.1f}, "
                     f"{e['bits_per_byte']:.3f} bits/byte ({e['tokens']:,} tokens, step {e['step']})")
    if last.get("router"):
        worst = max(s["max_over_mean"] for s in last["router"].values())
        dead = sum(s["dead_experts"] for s in last["router"].values())
        lines.append(f"experts        max/mean load {worst:.2f} (worst layer, last step), {dead} dead")
    checkpoints = list_checkpoints(run_dir)
    lines += [
        f"checkpoints    {', '.join(p.name for p in checkpoints) or 'none'} in {run_dir / CHECKPOINTS_DIR}",
        f"metrics        {run_dir / METRICS_FILE}",
        f"plots          {run_dir / PLOTS_DIR}",
    ]
    return "\n".join(lines)


def write_summary(run_dir: str | Path) -> str:
    text = summarize(run_dir)
    (Path(run_dir) / SUMMARY_FILE).write_text(text + "\n", encoding="utf-8")
    return text
