"""Sub-commands `kmodel train | eval | generate | demo`: argument parsing only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_commands(sub) -> None:
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_demo(sub)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a recipe into a run directory (or resume one)",
        description="Train RECIPE, writing config.yaml, metrics.jsonl, checkpoints/, plots/ and summary.txt to "
        "--out. A fresh run refuses a non-empty directory unless --force; --resume continues from its latest "
        "checkpoint with bit-identical results on CPU.",
    )
    p.add_argument("recipe", nargs="?", help="YAML recipe (e.g. recipes/tiny-ko-moe.yaml); optional with --resume, "
                   "which then uses the run's own config.yaml")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="total optimizer steps of the run (sets train.max_steps; the LR schedule follows it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in DIR from its latest checkpoint (a recipe given must match the run's, "
                   "except bookkeeping keys such as train.max_steps)")
    p.add_argument("--force", action="store_true",
                   help="delete the kmodel run in DIR and start a fresh one (only after the recipe and data load; "
                   "never a directory holding the working directory, the recipe or the data)")
    p.add_argument("--restart", action="store_true",
                   help="with --resume: train again from step 0 when no checkpoint is left although the run has "
                   "history (by default that is refused: unmounted or renamed checkpoints?)")
    p.add_argument("--ledger-gap", action="store_true",
                   help="with --resume: continue a run whose ledger.jsonl is missing or broken with a new chain "
                   "whose first record states the gap (by default that is refused)")
    add_init_from_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    p.set_defaults(func=_run_train)


def add_init_from_arguments(p: argparse.ArgumentParser) -> None:
    """--init-from CKPT [--keep-optimizer | --reset-optimizer]: shared by `kmodel train`, `kmodel launch` and the
    per-rank entry, so a stage starts the same way on one process and on a cluster."""
    p.add_argument("--init-from", metavar="CKPT",
                   help="start this run from a checkpoint's weights (verified): another run's, as a new stage whose "
                   "recipe may change seq_len, RoPE (rope_theta, rope_scaling), data, batch, schedule and parallel "
                   "layout but not the architecture; or an imported one (`kmodel import hf`). The step and the "
                   "learning-rate schedule start at 0. The ledger links a stage to the previous run's ledger, so "
                   "provenance verify walks every stage back to genesis; imported weights are reported as external")
    optimizer = p.add_mutually_exclusive_group()
    optimizer.add_argument("--keep-optimizer", dest="keep_optimizer", action="store_const", const=True, default=None,
                           help="with --init-from: continue from the checkpoint's optimizer moments under this "
                           "recipe's hyperparameters (the default when the checkpoint has them)")
    optimizer.add_argument("--reset-optimizer", dest="keep_optimizer", action="store_const", const=False,
                           help="with --init-from: start fresh optimizer moments")


def _run_train(args) -> int:
    from kmodel.config import ConfigError, load_config
    from kmodel.train.run import train
    from kmodel.train.watch import TrainingInterrupted

    if args.recipe is None and not args.resume:
        raise ConfigError("kmodel train needs a RECIPE (or --resume to continue the run in --out)")
    if args.recipe is None and args.overrides:
        raise ConfigError("--set needs a RECIPE; a resumed run without one keeps its config.yaml")
    cfg = load_config(args.recipe, args.overrides) if args.recipe else None
    try:
        train(cfg, args.out, resume=args.resume, max_steps=args.max_steps, force=args.force, restart=args.restart,
              ledger_gap=args.ledger_gap, recipe=args.recipe, progress=False if args.no_progress else None,
              init_from=args.init_from, keep_optimizer=args.keep_optimizer)
    except TrainingInterrupted as stopped:
        print(f"kmodel train: {stopped}", file=sys.stderr)
        return 128 + stopped.signum  # the shell's convention for "ended by a signal"
    return 0


def _add_device(p) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (auto: CUDA if present)")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out loss, perplexity and bits per byte of a checkpoint",
        description="Evaluate a checkpoint on text files (.jsonl/.json/.parquet/.txt). Prints one JSON object per "
        "file: tokens, loss (nats/token), perplexity and bits per byte (comparable across tokenizers).",
    )
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="files to evaluate on")
    p.add_argument("--text-key", default="text", help="JSON/parquet column holding the text (default: text)")
    p.add_argument("--seq-len", type=int, help="window length (default: the checkpoint's data.seq_len)")
    p.add_argument("--batch-size", type=int, help="windows per forward (default: train.micro_batch_size)")
    p.add_argument("--max-batches", type=int, help="evaluate only the first N batches of each file")
    _add_device(p)
    p.set_defaults(func=_run_eval)


def _load_for_inference(checkpoint: str, device: str):
    from kmodel.checkpoint import (
        TOKENIZER_DIR, Manifest, load_config_from_checkpoint, load_model, resolve_checkpoint, verify_checkpoint,
    )
    from kmodel.data import checkpoint_tokenizer
    from kmodel.train.trainer import resolve_device

    ckpt = resolve_checkpoint(checkpoint)
    cfg = load_config_from_checkpoint(ckpt)
    model = load_model(ckpt, resolve_device(device))
    # The tokenizer the model was trained with, by hash: another one (a swapped or edited tokenizer/, or one
    # missing so the recipe's would stand in) gives plausible but meaningless numbers.
    saved = [name for name in Manifest.read(ckpt).files if name.startswith(f"{TOKENIZER_DIR}/")]
    if saved:
        verify_checkpoint(ckpt, files=saved)
    return cfg, model, checkpoint_tokenizer(ckpt, cfg)


def _run_eval(args) -> int:
    from kmodel.config import ConfigError
    from kmodel.data import default_cache_dir, file_docs
    from kmodel.train.evaluate import evaluate_docs
    from kmodel.train.trainer import autocast_dtype

    for name in ("max_batches", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    cfg, model, tokenizer = _load_for_inference(args.checkpoint, args.device)
    context = cfg.model.max_position_embeddings
    if args.seq_len is not None and not 1 < args.seq_len <= context:
        raise ValueError(f"--seq-len must be between 2 and the model's context (max_position_embeddings {context}), "
                         f"got {args.seq_len}")
    seq_len = args.seq_len if args.seq_len is not None else (cfg.data.seq_len if cfg.data else None)
    if seq_len is None:
        raise ConfigError(f"{args.checkpoint}: its recipe has no data section; pass --seq-len")
    batch_size = args.batch_size or cfg.train.micro_batch_size
    amp = autocast_dtype(cfg.train.dtype, next(model.parameters()).device)
    for path in args.data:
        docs = file_docs(path, tokenizer, default_cache_dir(), args.text_key)
        result = evaluate_docs(model, docs, seq_len, batch_size, tokenizer.pad_id, amp, args.max_batches)
        print(json.dumps({"file": path, **result}))
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a checkpoint",
        description="Generate text with the KV cache (sliding-window layers keep only their window). The same "
        "--seed gives the same text.",
    )
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P",
                   help="nucleus sampling: sample from the smallest set of tokens with probability >= P (default 0.95)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="mtp: self-speculative decoding, the model's MTP depths draft and one forward checks them "
                   "(greedy: needs --temperature 0; the text equals plain greedy's); prints acceptance rate and "
                   "tokens per forward")
    _add_device(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from kmodel.train.generate import SpeculativeStats, generate_text

    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.speculative and args.temperature > 0:
        raise ValueError(f"--speculative {args.speculative} is greedy: add --temperature 0")
    _, model, tokenizer = _load_for_inference(args.checkpoint, args.device)
    for prompt in args.prompt:
        stats = SpeculativeStats()
        text = generate_text(model, tokenizer, prompt, args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, speculative=args.speculative, stats=stats)
        print(f"{prompt}{text}")
        if args.speculative:
            print(stats.summary(), file=sys.stderr)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the end-to-end CPU demo: train the tiny Korean MoE, evaluate, generate",
        description="Train recipes/tiny-ko-moe.yaml on the bundled Korean/English/code corpus with the shipped "
        "Korean tokenizer, evaluate on the held-out split, generate Korean continuations, and print where the run "
        "directory, plots and metrics are. About 3 minutes on two idle CPU cores.",
    )
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/demo-<date>-<time>)")
    p.add_argument("--max-steps", type=int, metavar="N", help="train for N steps instead of the recipe's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from kmodel.train.demo import run_demo

    run_demo(Path(args.out) if args.out else None, max_steps=args.max_steps,
             progress=False if args.no_progress else None)
    return 0
