"""What `kmodel plan` predicts per GPU against what the trainer's ranks measure, on 4 CPU processes.

For each layout (EP 1/2/4 x ZeRO 1/2/3 where the engine runs it) the tiny recipe trains 1 step on 4 gloo ranks
(fp32, micro-batch 1, accumulation 2); every rank writes its `{"kind": "memory"}` record at that step, and the
largest value per category is set against the plan for the same recipe on 1 node x 4 GPUs.

    python -P bench/plan_vs_measured.py     (from the repository root; writes bench/results/plan_vs_measured.*)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kmodel.config import load_config
from kmodel.plan import Cluster, make_plan
from kmodel.train.memory import CATEGORIES, record_key

RECIPE = "recipes/tiny-ko-moe.yaml"
TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "data.seq_len=64", "train.micro_batch_size=1",
        "train.grad_accum_steps=2", "train.max_steps=1", "train.warmup_steps=0", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=100", "provenance.ledger=false", "train.device=cpu",
        "parallel.backend=deepspeed", "parallel.world_size=4"]
LAYOUTS = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (4, 1), (4, 2)]  # (EP, ZeRO): ZeRO-3 with EP is refused
RESULTS = Path("bench/results")


def measure(ep: int, stage: int, run_dir: Path) -> dict[str, int]:
    sets = [*TINY, f"parallel.expert_parallel_size={ep}", f"parallel.zero_stage={stage}"]
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "kmodel.parallel.entry", RECIPE, "--out", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]
    memory = [r for r in records if r["kind"] == "memory"]
    return {c: max(r[record_key(c)] for r in memory) for c in CATEGORIES}


def planned(ep: int, stage: int) -> dict[str, float]:
    cfg = load_config(RECIPE, [*TINY, f"parallel.expert_parallel_size={ep}", f"parallel.zero_stage={stage}"])
    return make_plan(cfg, Cluster(nodes=1, gpus_per_node=4)).memory.by_category()


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ep, stage in LAYOUTS:
            got, plan = measure(ep, stage, Path(tmp) / f"ep{ep}_zero{stage}"), planned(ep, stage)
            rows.append({"ep": ep, "zero": stage, **{f"{c}_measured": got[c] for c in CATEGORIES},
                         **{f"{c}_planned": plan[c] for c in CATEGORIES}})
            print(rows[-1], flush=True)
    header = "| EP | ZeRO | " + " | ".join(f"{c} measured / planned (KiB, error)" for c in CATEGORIES) + " |"
    lines = [f"4 CPU ranks (gloo), tiny-ko-moe (hidden 64, 2 layers, seq 64), fp32, micro 1 x accumulation 2; "
             f"largest value over the ranks at step 1. Load average {load[0]:.1f} (does not affect bytes).", "",
             header, "|" + "---|" * (2 + len(CATEGORIES))]
    for r in rows:
        cells = [f"{r[c + '_measured'] / 1024:,.0f} / {r[c + '_planned'] / 1024:,.0f} "
                 f"({(r[c + '_measured'] / r[c + '_planned'] - 1) * 100:+.1f}%)" for c in CATEGORIES]
        lines.append(f"| {r['ep']} | {r['zero']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plan_vs_measured.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "plan_vs_measured.md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
