"""Sub-commands `kmodel data prepare | verify`: argument parsing only."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="prepare training data: tokenized, memory-mapped token shards",
                       description="Offline data preparation (see docs/data.md).")
    commands = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    _add_prepare(commands)
    _add_verify(commands)


def _add_prepare(commands) -> None:
    p = commands.add_parser(
        "prepare",
        help="tokenize a recipe's sources into token shards",
        description="Tokenize RECIPE's data.sources with its data.tokenizer in parallel worker processes, streaming "
        "every file, into memory-mapped token shards under --out with a manifest (per-shard sha256, token and "
        "document counts, source file hashes, tokenizer hash). Run it again after a kill: complete shards are kept. "
        "Train on the result with --set data.prepared=DIR.",
    )
    p.add_argument("recipe", help="YAML recipe whose data section names the sources and the tokenizer")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for manifest.json and shards/")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (default 1)")
    p.add_argument("--part-mb", type=float, default=256, metavar="MB",
                   help="input megabytes per shard: files are cut into parts of this size for the workers (default 256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe key, e.g. --set data.tokenizer=DIR (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from kmodel.config import ConfigError, load_config
    from kmodel.data.prepare import prepare

    cfg = load_config(args.recipe, args.overrides)
    if cfg.data is None or not cfg.data.sources:
        raise ConfigError(f"{args.recipe} has no data.sources to prepare")
    if args.part_mb <= 0:
        raise ConfigError(f"--part-mb must be positive, got {args.part_mb}")
    prepared = prepare(cfg.data, args.out, workers=args.workers, part_bytes=max(1, int(args.part_mb * 2**20)),
                       progress=False if args.no_progress else None)
    for source in prepared.sources:
        tokens = sum(s["tokens"] for s in source["shards"])
        documents = sum(s["documents"] for s in source["shards"])
        print(f"{source['name']}: {tokens:,} tokens, {documents:,} documents in {len(source['shards'])} shards")
    print(f"prepared {prepared.directory} (tokenizer {prepared.manifest['tokenizer']['sha256'][:16]}..., "
          f"shards root {prepared.manifest['shards_root'][:16]}...); train with --set data.prepared={prepared.directory}")
    return 0


def _add_verify(commands) -> None:
    p = commands.add_parser("verify", help="re-hash every shard of a prepared directory",
                            description="Check every shard of DIR against the sha256 its manifest records.")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=_run_verify)


def _run_verify(args) -> int:
    from kmodel.data.shards import PreparedData

    prepared = PreparedData(args.directory)
    bad = prepared.verify()
    for path in bad:
        print(f"MISMATCH {path}")
    shards = sum(len(s["shards"]) for s in prepared.sources)
    print(f"{args.directory}: {shards} shards, {'all match the manifest' if not bad else f'{len(bad)} do not match'}")
    return 1 if bad else 0
