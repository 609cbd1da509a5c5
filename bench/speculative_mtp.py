"""Benchmark: greedy decoding with and without MTP self-speculation (`kmodel generate --speculative mtp`).

A tiny model is trained for a few steps on text that repeats one cycle of tokens, so its MTP depths can
learn to draft; then it decodes the same prompt plainly and speculatively at each depth. Reports main-model
forwards, tokens per forward, the acceptance rate and wall time per token (best of `--repeats`), checks that
both decodes give the same tokens, and writes a markdown table and JSON under bench/results/ naming the
device and the machine load. On a CPU the wall time mostly measures Python overhead of tiny shapes; tokens
per forward is the device-independent figure.

    python -P bench/speculative_mtp.py [--depths 1 2 4] [--tokens 64] [--repeats 3]   (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from kmodel.config import load_config
from kmodel.model import build_model
from kmodel.train.generate import SpeculativeStats, generate_ids, generate_ids_speculative

SMALL = [
    "model.vocab_size=61", "model.hidden_size=32", "model.head_dim=8", "model.intermediate_size=48",
    "model.num_experts=0", "model.num_hidden_layers=2", "model.sliding_window=3", "model.sliding_window_pattern=LG",
    "kernels.attention=torch", "kernels.norm=torch", "kernels.loss=torch",
]
CYCLE = [3, 14, 15, 9, 26, 5, 35]


def trained_model(depth: int, steps: int):
    cfg = load_config("recipes/tiny-ko-moe.yaml", SMALL + [f"model.num_nextn_predict_layers={depth}"])
    model = build_model(cfg)
    cycle = torch.tensor(CYCLE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(CYCLE), (4,), generator=generator)
        ids = torch.stack([cycle[(start + torch.arange(13)) % len(CYCLE)] for start in starts])
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(prog="bench/speculative_mtp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="training steps of the tiny model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/speculative_mtp_cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    prompt = CYCLE[:4]
    rows = []
    for depth in args.depths:
        model = trained_model(depth, args.steps)
        plain = generate_ids(model, prompt, args.tokens, temperature=0)
        stats = SpeculativeStats()
        speculative = generate_ids_speculative(model, prompt, args.tokens, stats=stats)
        if speculative != plain:
            raise SystemExit(f"depth {depth}: speculative decoding differs from plain greedy decoding")
        plain_s = best_time(lambda m=model: generate_ids(m, prompt, args.tokens, temperature=0), args.repeats)
        spec_s = best_time(lambda m=model: generate_ids_speculative(m, prompt, args.tokens), args.repeats)
        rows.append({
            "depth": depth, "tokens": stats.tokens, "forwards": stats.forwards,
            "tokens_per_forward": round(stats.tokens_per_forward, 3), "acceptance_rate": round(stats.acceptance_rate, 3),
            "plain_ms_per_token": round(1e3 * plain_s / args.tokens, 3),
            "speculative_ms_per_token": round(1e3 * spec_s / args.tokens, 3),
        })
    load = os.getloadavg()[0]
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f})"
    lines = [
        f"# MTP self-speculative decoding ({device}, torch {torch.__version__})", "",
        f"Tiny model (hidden 32, 2 layers) trained {args.steps} steps on a repeating {len(CYCLE)}-token cycle; "
        f"{args.tokens} greedy tokens; times best of {args.repeats}. Identical tokens checked.", "",
        "| MTP depth | forwards | tokens / forward | drafts accepted | plain ms / token | speculative ms / token |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['depth']} | {r['forwards']} | {r['tokens_per_forward']:.2f} | {r['acceptance_rate']:.0%} | "
        f"{r['plain_ms_per_token']:.2f} | {r['speculative_ms_per_token']:.2f} |"
        for r in rows
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
