"""`kmodel demo`: the README's first command, end to end on CPU.

Corpus (data/corpus, bundled) -> shipped Korean tokenizer -> train recipes/tiny-ko-moe.yaml -> evaluate on
the whole held-out split -> a few sampled Korean continuations -> where everything is.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from kmodel.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO_ROOT / "recipes" / "tiny-ko-moe.yaml"
DEMO_PROMPTS = ("대화 상자에서", "셀에 수식을 입력하려면", "LibreOffice에서 매크로를")
EVAL_FILE = "heldout_eval.json"
SAMPLES_FILE = "samples.txt"


def _anchored(path: str) -> str:
    """A recipe's relative data path, made absolute against the repository so the demo runs from any directory."""
    return path if Path(path).is_absolute() else str(REPO_ROOT / path)


def demo_config(max_steps: int | None) -> Config:
    if not DEMO_RECIPE.is_file():
        raise FileNotFoundError(f"{DEMO_RECIPE} not found: `kmodel demo` runs from a kmodel checkout (pip install -e .)")
    cfg = load_config(DEMO_RECIPE)
    for source in cfg.data.sources:
        source.path = _anchored(source.path)
    cfg.data.heldout = [_anchored(p) for p in cfg.data.heldout]
    if max_steps is not None:  # a shorter demo warms up within its steps
        train = {**cfg.train.model_dump(), "max_steps": max_steps, "warmup_steps": min(cfg.train.warmup_steps, max_steps)}
        cfg.train = type(cfg.train).model_validate(train)
    return cfg


def run_demo(out_dir: Path | None, max_steps: int | None = None, progress: bool | None = None) -> Path:
    from kmodel.data import file_docs
    from kmodel.train.evaluate import combine_results, evaluate_docs
    from kmodel.train.generate import generate_text
    from kmodel.train.run import train

    started = time.perf_counter()
    cfg = demo_config(max_steps)
    run_dir = out_dir or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    t = cfg.train
    print(f"[1/3] training {cfg.name}: {t.max_steps} steps x {t.micro_batch_size * t.grad_accum_steps} rows x "
          f"{cfg.data.seq_len} tokens on {len(cfg.data.sources)} sources ({', '.join(s.name for s in cfg.data.sources)}) "
          f"-> {run_dir}", flush=True)
    trainer = train(cfg, run_dir, progress=progress)

    print("[2/3] held-out evaluation (whole split):", flush=True)
    results = {}
    for path in cfg.data.heldout:
        docs = file_docs(path, trainer.tokenizer, trainer.cache_dir)
        results[path] = evaluate_docs(trainer.model, docs, cfg.data.seq_len, t.micro_batch_size,
                                      trainer.tokenizer.pad_id, trainer.amp_dtype)
        r = results[path]
        print(f"  {Path(path).name:32s} loss {r['loss']:.3f}  ppl {r['perplexity']:8.1f}  "
              f"{r['bits_per_byte']:.3f} bits/byte  ({r['tokens']:,} tokens)")
    overall = combine_results(results.values())
    (run_dir / EVAL_FILE).write_text(json.dumps({"overall": overall, "files": results}, indent=1), encoding="utf-8")

    print("[3/3] Korean continuations (temperature 0.8, top-p 0.95, seed 0):", flush=True)
    samples = []
    for prompt in DEMO_PROMPTS:
        text = generate_text(trainer.model, trainer.tokenizer, prompt, 48, temperature=0.8, top_p=0.95, seed=0)
        samples.append(f"{prompt}{text}")
        print(f"  > {prompt}\u2502{text}")
    (run_dir / SAMPLES_FILE).write_text("\n\n".join(samples) + "\n", encoding="utf-8")

    print(f"\ndone in {time.perf_counter() - started:.0f} s. Run directory {run_dir}:\n"
          f"  metrics      {run_dir / 'metrics.jsonl'}\n"
          f"  plots        {run_dir / 'plots'}/ (loss, lr, throughput, expert_load)\n"
          f"  checkpoints  {run_dir / 'checkpoints'}/\n"
          f"  held-out     {run_dir / EVAL_FILE}\n"
          f"  samples      {run_dir / SAMPLES_FILE}\n"
          f"try: kmodel generate {run_dir} --prompt '셀 서식을'")
    return run_dir
