"""Benchmark: Muon against AdamW on the tiny recipe and a wider variant, same tokens, each at its best learning rate.

For each model size and optimizer, a short run per learning rate of a small grid (same data order, same
schedule: warm-up then cosine); the best run is the one with the lowest final held-out bits per byte. Writes
bench/results/muon_vs_adamw_cpu.{md,json} (final values, median step time, Muon's step-time overhead, and the
optimizer step alone timed on the same model) and muon_vs_adamw_cpu.png (held-out bits/byte against tokens,
the best run of each optimizer). A script of the repository: run it from the repository root.

    python -P bench/muon_vs_adamw.py [--steps 40] [--lrs 0.003,0.01,0.03] [--sizes tiny,wide] [--cache DIR]
    python -P bench/muon_vs_adamw.py --sizes wide --transfer-from tiny   # wide at tiny's best rates
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kmodel.config import load_config
from kmodel.model import build_model
from kmodel.train import Trainer
from kmodel.train.metrics import read_metrics
from kmodel.train.optim import build_optimizer

RECIPE = "recipes/tiny-ko-moe.yaml"
SIZES = {
    "tiny": [],
    "wide": ["model.hidden_size=192", "model.intermediate_size=576", "model.head_dim=48", "model.moe_intermediate_size=144"],
}
COMMON = ["data.seq_len=128", "train.micro_batch_size=8", "train.warmup_steps=8", "train.eval_batches=4",
          "train.checkpoint_every=100000", "provenance.ledger=false"]
RESULTS = Path("bench/results")


def run(size: str, optimizer: str, lr: float, steps: int, root: Path) -> dict:
    overrides = COMMON + SIZES[size] + [f"train.optimizer={optimizer}", f"train.lr={lr}", f"train.max_steps={steps}",
                                        f"train.eval_every={max(1, steps // 4)}"]
    cfg = load_config(RECIPE, overrides)
    load = os.getloadavg()[0]
    run_dir = root / f"{size}-{optimizer}-{lr:g}"
    run_dir.mkdir(parents=True)
    trainer = Trainer(cfg, run_dir, progress=False)
    trainer.fit()
    trainer.finish()
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    tokens_per_step = train[0]["tokens"] // train[0]["step"]
    curve = [(r["step"] * tokens_per_step, r["bits_per_byte"]) for r in records if r["kind"] == "eval"]
    return {"size": size, "optimizer": optimizer, "lr": lr, "curve": curve, "final_bits_per_byte": curve[-1][1],
            "final_train_loss": train[-1]["lm_loss"], "median_step_s": statistics.median(r["step_seconds"] for r in train[2:]),
            "skipped_steps": sum(r["skipped"] for r in train), "load": load}


def optimizer_step_seconds(size: str, optimizer: str, repeats: int = 7) -> float:
    """Median time of optimizer.step() alone on the size's model with fixed random gradients."""
    cfg = load_config(RECIPE, COMMON + SIZES[size] + [f"train.optimizer={optimizer}"])
    model = build_model(cfg, "cpu")
    opt = build_optimizer(model, cfg.train)
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def write_outputs(results: list[dict], optimizer_times: dict, load: tuple[float, float], steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [r["load"] for r in results if "load" in r] + list(load)
    best = {}
    for r in results:
        key = (r["size"], r["optimizer"])
        if key not in best or r["final_bits_per_byte"] < best[key]["final_bits_per_byte"]:
            best[key] = r
    sizes = list(dict.fromkeys(r["size"] for r in results))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for optimizer, style in (("adamw", "o-"), ("muon", "s-")):
            if (size, optimizer) in best:
                r = best[(size, optimizer)]
                ax.plot(*zip(*r["curve"]), style, label=f"{optimizer} (lr {r['lr']:g})")
        ax.set(xlabel="training tokens", ylabel="held-out bits / byte", title=f"{size}: held-out bits/byte")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "muon_vs_adamw_cpu.png", dpi=110)

    lines = [
        "# Muon vs AdamW: tiny recipe and a wider variant, same tokens, best learning rate of each",
        "",
        (f"Device: CPU ({platform.machine()}, {torch.get_num_threads()} thread per run); torch {torch.__version__}; "
        f"load average {min(loads):.1f} to {max(loads):.1f} (sampled as runs started and at the end; 2 cores shared "
        f"with other jobs: step times are indicative, compare within a size); {time.strftime('%Y-%m-%d')}."),
        f"Recipe {RECIPE} with {' '.join(COMMON)}; {steps} steps of 8 x 128 tokens; warm-up then cosine; held-out "
        "bits/byte over the three held-out files (4 batches each). wide: " + " ".join(SIZES["wide"]) + ".",
        ("Muon: Nesterov momentum 0.95, 5 Newton-Schulz steps, update scaled by 0.2 sqrt(max(m, n)), weight decay 0.1 on "
        "its matrices; AdamW (embeddings, head, routers, norms, biases) at the same learning rate."),
        "",
        "## Learning-rate sweep (final held-out bits/byte)",
        "",
        "| size | optimizer | " + " | ".join(f"lr {lr:g}" for lr in sorted({r['lr'] for r in results})) + " |",
        "|---|---|" + "---|" * len({r["lr"] for r in results}),
    ]
    for size in sizes:
        for optimizer in ("adamw", "muon"):
            cells = []
            for lr in sorted({r["lr"] for r in results}):
                match = [r for r in results if (r["size"], r["optimizer"], r["lr"]) == (size, optimizer, lr)]
                cells.append(f"{match[0]['final_bits_per_byte']:.4f}" if match else "")
            lines.append(f"| {size} | {optimizer} | " + " | ".join(cells) + " |")
    transferred = [size for size in sizes if len({r["lr"] for r in results if r["size"] == size}) <= 2]
    if transferred:
        lines += ["", (f"Not swept (CPU budget): {', '.join(transferred)}, trained at each optimizer's best rate on the "
                      "swept size (Muon's RMS matching is meant to let a rate carry over).")]
    lines += [
        "",
        "## Best of each",
        "",
        ("| size | optimizer | best lr | final held-out bits/byte | final train LM loss | median step (s) | "
        "optimizer step alone (s) |"),
        "|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for optimizer in ("adamw", "muon"):
            r = best.get((size, optimizer))
            if r:
                lines.append(f"| {size} | {optimizer} | {r['lr']:g} | {r['final_bits_per_byte']:.4f} | "
                             f"{r['final_train_loss']:.4f} | {r['median_step_s']:.3f} | "
                             f"{optimizer_times[(size, optimizer)]:.4f} |")
    lines += ["", "## Muon against AdamW", ""]
    for size in sizes:
        a, m = best.get((size, "adamw")), best.get((size, "muon"))
        if a and m:
            lines.append(
                f"- {size}: held-out bits/byte {m['final_bits_per_byte']:.4f} (Muon) vs {a['final_bits_per_byte']:.4f} "
                f"(AdamW), {100 * (m['final_bits_per_byte'] / a['final_bits_per_byte'] - 1):+.1f}%; optimizer step "
                f"alone x{optimizer_times[(size, 'muon')] / optimizer_times[(size, 'adamw')]:.2f}, i.e. Muon adds "
                f"{optimizer_times[(size, 'muon')] - optimizer_times[(size, 'adamw')]:.3f} s, "
                f"{100 * (optimizer_times[(size, 'muon')] - optimizer_times[(size, 'adamw')]) / a['median_step_s']:.0f}% "
                f"of AdamW's median step (the runs' own median steps, x{m['median_step_s'] / a['median_step_s']:.2f}, "
                "mostly measure the load at the time).")
    (RESULTS / "muon_vs_adamw_cpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    payload = {"load": load, "steps": steps, "runs": results,
               "optimizer_step_s": {f"{s}/{o}": t for (s, o), t in optimizer_times.items()}}
    (RESULTS / "muon_vs_adamw_cpu.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/muon_vs_adamw.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--lrs", default="0.003,0.01,0.03", help="learning-rate grid, comma-separated")
    parser.add_argument("--sizes", default="tiny,wide", help=f"model sizes among {', '.join(SIZES)}")
    parser.add_argument("--transfer-from", help="instead of sweeping, use each optimizer's best lr on this size")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kmodel-muon-bench",
                        help="where finished runs are kept (a rerun skips them; the table uses every cached run)")
    args = parser.parse_args()
    lrs = [float(x) for x in args.lrs.split(",") if x]  # empty: only tabulate the cached runs
    sizes = args.sizes.split(",")
    load_before = os.getloadavg()[0]
    done = args.cache / f"steps{args.steps}.jsonl"  # finished runs, so an interrupted sweep continues
    args.cache.mkdir(parents=True, exist_ok=True)
    results = [json.loads(line) for line in done.open(encoding="utf-8")] if done.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for optimizer in ("adamw", "muon"):
                if args.transfer_from:  # no sweep: the optimizer's best learning rate on the other size
                    swept = [r for r in results if (r["size"], r["optimizer"]) == (args.transfer_from, optimizer)]
                    lrs = [min(swept, key=lambda r: r["final_bits_per_byte"])["lr"]]
                for lr in lrs:
                    if any((r["size"], r["optimizer"], r["lr"]) == (size, optimizer, lr) for r in results):
                        continue
                    results.append(run(size, optimizer, lr, args.steps, Path(tmp)))
                    r = results[-1]
                    with done.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(r) + "\n")
                    print(f"{size} {optimizer} lr {lr:g}: bits/byte {r['final_bits_per_byte']:.4f}, "
                          f"step {r['median_step_s']:.3f} s", flush=True)
    results = [r for r in results if r["size"] in sizes]
    optimizer_times = {(s, o): optimizer_step_seconds(s, o) for s in sizes for o in ("adamw", "muon")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_outputs(results, optimizer_times, (load_before, os.getloadavg()[0]), args.steps)
    print((RESULTS / "muon_vs_adamw_cpu.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
