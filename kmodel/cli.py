"""The `kmodel` command: argument parsing only; every command calls one function of a room."""

from __future__ import annotations

import argparse
import sys

from kmodel.config import ConfigError


def _add_init(sub) -> None:
    p = sub.add_parser(
        "init",
        help="write a freshly initialised checkpoint (no training)",
        description="Build the recipe's model with weights drawn deterministically from the seed and save it "
        "as a checkpoint directory (model.safetensors + resolved config.yaml).",
    )
    p.add_argument("recipe", help="YAML recipe (e.g. recipes/tiny-ko-moe.yaml)")
    p.add_argument("--out", required=True, help="checkpoint directory to create (must not exist)")
    p.add_argument("--seed", type=int, help="initialisation seed; sets the recipe's top-level `seed`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe key, e.g. --set model.num_experts=16 (repeatable)")
    p.set_defaults(func=_run_init)


def _run_init(args) -> int:
    from kmodel.config import load_config
    from kmodel.checkpoint import save_checkpoint
    from kmodel.model import build_model

    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.recipe, overrides)
    save_checkpoint(args.out, build_model(cfg), cfg)
    print(f"wrote initial checkpoint {args.out} (seed {cfg.seed})")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to another format",
                       description="Export a kmodel checkpoint for other tools.")
    formats = p.add_subparsers(dest="format", required=True)
    hf = formats.add_parser(
        "hf",
        help="Hugging Face transformers directory",
        description="Write config.json + safetensors shards with model.safetensors.index.json (+ tokenizer) that "
        "transformers.AutoModelForCausalLM.from_pretrained loads with its built-in class for this architecture "
        "(exaone_moe, exaone4, solar_open, ...), streamed one tensor at a time. Configs no transformers class can "
        "express are refused, naming the feature.",
    )
    hf.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    hf.add_argument("out_dir", help="output directory (must not exist or be empty)")
    hf.add_argument("--family", help="force a transformers model_type instead of choosing one from the config")
    hf.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the exported floating-point weights (default: bfloat16)")
    hf.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default: 5GB; a bigger tensor gets its own)")
    hf.set_defaults(func=_run_export_hf)


def _run_export_hf(args) -> int:
    from kmodel.export.hf import export_hf

    family = export_hf(args.checkpoint, args.out_dir, family=args.family, dtype=args.dtype,
                       max_shard_size=args.max_shard_size)
    print(f"exported {args.checkpoint} to {args.out_dir} as transformers model_type {family!r}")
    return 0


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="import a checkpoint from another format",
                       description="Make a kmodel checkpoint from another tool's weights.")
    formats = p.add_subparsers(dest="format", required=True)
    hf = formats.add_parser(
        "hf",
        help="Hugging Face transformers directory (the inverse of `kmodel export hf`)",
        description="Read a transformers directory of an exportable family (config.json, safetensors shards and "
        "index) one tensor at a time into a kmodel checkpoint: the exact inverse of `kmodel export hf`. The model "
        "config comes from the export's kmodel/config.yaml or --recipe and must reproduce config.json. Start a "
        "run from it with `kmodel train RECIPE --init-from CKPT`.",
    )
    hf.add_argument("hf_dir", help="transformers model directory")
    hf.add_argument("--out", required=True, help="checkpoint directory to write (must not exist)")
    hf.add_argument("--family", help="the transformers model_type, when config.json's should not be used")
    hf.add_argument("--recipe", help="kmodel recipe describing the model, for a directory kmodel did not export")
    hf.set_defaults(func=_run_import_hf)


def _run_import_hf(args) -> int:
    from kmodel.export.hf_import import import_hf

    import_hf(args.hf_dir, args.out, family=args.family, recipe=args.recipe)
    print(f"imported {args.hf_dir} into checkpoint {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmodel", description="Train, evaluate, export and verify Korean MoE foundation models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_init(sub)
    _add_export(sub)
    _add_import(sub)
    for room in _rooms():
        room.add_commands(sub)
    return parser


def _rooms():
    """Rooms that bring their own sub-commands."""
    from kmodel import bench
    from kmodel.data import cli as data_cli
    from kmodel.parallel import cli as parallel_cli
    from kmodel.provenance import cli as provenance_cli
    from kmodel.tokenizer import cli as tokenizer_cli
    from kmodel.train import cli as train_cli

    return [train_cli, data_cli, tokenizer_cli, parallel_cli, provenance_cli, bench]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"kmodel {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"kmodel {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
