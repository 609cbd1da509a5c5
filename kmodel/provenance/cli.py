"""`kmodel provenance verify | replay | compare | audit | report | sign | keygen`: argument parsing only."""

from __future__ import annotations

import json
from pathlib import Path


def add_commands(sub) -> None:
    parser = sub.add_parser(
        "provenance",
        help="verify that a run was trained from scratch; test checkpoints for derivation",
        description="Provenance of kmodel runs: every training run writes a hash-chained ledger (DIR/ledger.jsonl). "
        "These commands check it, replay parts of the run, test two models for shared weights or initialisation, "
        "audit the code for foreign model code, and render a report.",
    )
    commands = parser.add_subparsers(dest="provenance_command", required=True, metavar="SUBCOMMAND")
    _add_verify(commands)
    _add_replay(commands)
    _add_compare(commands)
    _add_audit(commands)
    _add_report(commands)
    _add_sign(commands)
    _add_keygen(commands)


def _print_json(value) -> None:
    print(json.dumps(value, indent=1))


# --- verify -------------------------------------------------------------------------------------------


def _add_verify_options(p) -> None:
    p.add_argument("--skip-init", action="store_true",
                   help="do not rebuild the initial weights from the seed (needs the whole model in CPU memory)")
    p.add_argument("--skip-data", action="store_true", help="do not re-hash the training data files")
    p.add_argument("--data-root", metavar="DIR",
                   help="directory the run was started from; the recipe's relative data paths are resolved there")
    p.add_argument("--public-key", metavar="HEX",
                   help="ed25519 public key (hex) that must have signed the ledger head; without it a signature "
                   "is checked against the key it carries, and an unsigned ledger is only noted")


def _add_verify(commands) -> None:
    p = commands.add_parser(
        "verify",
        help="check a run's ledger chain and recompute every hash it can",
        description="Check the hash chain of DIR/ledger.jsonl and its signature, the config, the code commit, the "
        "initial weights (rebuilt from the seed and config alone), the tokenizer, the data files (and Merkle root), "
        "every checkpoint still on disk (files, weights, optimizer, RNG and data-position hashes), that no checkpoint "
        "is unrecorded, and that metrics.jsonl agrees with the ledger. Each check prints pass, fail, warn or skip "
        "with its reason. Exit status 1 when any check fails.",
    )
    p.add_argument("run_dir", metavar="DIR", help="run directory (holds ledger.jsonl)")
    _add_verify_options(p)
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=_run_verify)


def _verify(args):
    from kmodel.provenance.verify import verify_run

    return verify_run(args.run_dir, check_init=not args.skip_init, check_data=not args.skip_data,
                      data_root=args.data_root, public_key=args.public_key)


def _run_verify(args) -> int:
    from kmodel.provenance.verify import checks_as_dicts, failed, format_checks

    checks = _verify(args)
    if args.json:
        _print_json(checks_as_dicts(checks))
    else:
        print(format_checks(checks))
    return 1 if failed(checks) else 0


# --- replay -------------------------------------------------------------------------------------------


def _add_replay(commands) -> None:
    p = commands.add_parser(
        "replay",
        help="retrain recorded segments of a run and compare with the ledger",
        description="Restore the checkpoint of step STEP (STEP 0: the seed-initialised model), regenerate the "
        "batches from the seed and the data manifest, train K steps and compare batches, loss, lr, grad norm, "
        "weights, optimizer and RNG state with every checkpoint the ledger recorded on the way. On CPU with "
        "provenance.deterministic the replay must be bit-identical; on GPU it is replayed twice and must lie within "
        "the spread of the two replays. Exit status 1 when a replay does not match.",
    )
    p.add_argument("run_dir", metavar="DIR", help="run directory (holds ledger.jsonl and checkpoints/)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--from", dest="from_step", type=int, metavar="STEP",
                       help="recorded checkpoint step to start from (0: from the seed)")
    which.add_argument("--random", type=int, metavar="N", help="replay N segments between recorded checkpoints, drawn at random")
    p.add_argument("--steps", type=int, metavar="K",
                   help="steps to replay from STEP; STEP+K must be a recorded checkpoint (default: up to the next one)")
    p.add_argument("--seed", type=int, help="seed of the --random draw (default: fresh randomness)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where to replay (default: the run's train.device)")
    p.add_argument("--tolerance-factor", type=float, default=None, metavar="F",
                   help="non-deterministic devices: pass when the distance to the recorded weights is at most F times "
                   "the distance between two replays (default 4)")
    p.add_argument("--data-root", metavar="DIR",
                   help="directory the run was started from; the recipe's relative data paths are resolved there")
    p.add_argument("--json", action="store_true", help="print the results as a JSON list (input for report --replay-json)")
    p.set_defaults(func=_run_replay)


def _run_replay(args) -> int:
    from kmodel.provenance.replay import (
        DEFAULT_TOLERANCE_FACTOR,
        format_result,
        random_segments,
        replay,
    )

    if args.random is not None and args.steps is not None:
        raise ValueError("--steps goes with --from; --random replays whole segments between recorded checkpoints")
    if args.random is not None and args.random <= 0:
        raise ValueError(f"--random must be positive, got {args.random}")
    segments = random_segments(args.run_dir, args.random, args.seed) if args.random is not None else [(args.from_step, args.steps)]
    factor = DEFAULT_TOLERANCE_FACTOR if args.tolerance_factor is None else args.tolerance_factor
    results = [replay(args.run_dir, start, steps, device=args.device, tolerance_factor=factor, data_root=args.data_root)
               for start, steps in segments]
    if args.json:
        _print_json([r.as_dict() for r in results])
    else:
        print("\n\n".join(format_result(r) for r in results))
    return 0 if all(r.passed for r in results) else 1


# --- compare ------------------------------------------------------------------------------------------


def _add_compare(commands) -> None:
    from kmodel.provenance.compare import DEFAULT_ALPHA, DEFAULT_MAX_UNITS

    p = commands.add_parser(
        "compare",
        help="test whether two models share weights or an initialisation, per module",
        description="A and B are kmodel checkpoint directories or Hugging Face safetensors directories. Each module "
        "(embedding, LM head, attention, MLP, routed experts, router, shared experts of every layer) gets a p-value "
        "under the hypothesis that A and B were initialised independently, from statistics that permuted units, "
        "heads and experts, a permuted residual stream, rescaling and further training do not hide; the report "
        "names the modules that are shared and compares the tokenizers. See docs/provenance.md.",
    )
    p.add_argument("a", metavar="A", help="first model directory")
    p.add_argument("b", metavar="B", help="second model directory")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE (input for report --compare-json)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"significance level of the verdict and of the per-module flags (default {DEFAULT_ALPHA:g})")
    p.add_argument("--tokenizer-a", metavar="PATH", help="tokenizer of A, when not inside its directory")
    p.add_argument("--tokenizer-b", metavar="PATH", help="tokenizer of B, when not inside its directory")
    p.add_argument("--max-units", type=int, default=DEFAULT_MAX_UNITS,
                   help=f"units of a module matched at most, evenly subsampled beyond (default {DEFAULT_MAX_UNITS})")
    p.add_argument("--all-layer-pairs", action="store_true",
                   help="compare every layer of A with every layer of B (default: same-index layers, or all pairs "
                   "when the layer counts differ), to find a layer copied to another depth")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from kmodel.provenance.compare import compare, format_report, write_json

    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.max_units < 2:
        raise ValueError(f"--max-units must be at least 2, got {args.max_units}")
    report = compare(args.a, args.b, tokenizer_a=args.tokenizer_a, tokenizer_b=args.tokenizer_b, alpha=args.alpha,
                     max_units=args.max_units, all_layer_pairs=True if args.all_layer_pairs else None)
    if args.out:
        write_json(report, args.out)
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0


# --- audit --------------------------------------------------------------------------------------------


def _add_audit(commands) -> None:
    p = commands.add_parser(
        "audit",
        help="list third-party model code and outside weight files on the training path",
        description="Parse kmodel's source tree and list every import of third-party model code (transformers, timm, "
        "peft, ...) and every weight-loading call, marking what is reachable from the trainer; list declared "
        "dependencies that ship model code. With --run, also train a few steps of RECIPE and resume them in a child "
        "process that records every file read and module imported, and fail on any weight file read from outside "
        "the run or any model-code package imported. Exit status 1 when anything fails.",
    )
    p.add_argument("--run", metavar="RECIPE", help="also audit a short real training run of this recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe key for the audited run (repeatable), e.g. to make it small")
    p.add_argument("--steps", type=int, default=2, help="steps of the audited run, and of its resume (default 2)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=_run_audit)


def _run_audit(args) -> int:
    from kmodel.provenance.audit import (
        audit,
        failed,
        findings_as_dicts,
        format_findings,
    )

    if args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.overrides and not args.run:
        raise ValueError("--set applies to the audited run; give --run RECIPE")
    findings = audit(run_recipe=args.run, overrides=args.overrides, steps=args.steps)
    if args.json:
        _print_json(findings_as_dicts(findings))
    else:
        print(format_findings(findings))
    return 1 if failed(findings) else 0


# --- report -------------------------------------------------------------------------------------------


def _add_report(commands) -> None:
    p = commands.add_parser(
        "report",
        help="render ledger, verification and loss curve into one HTML page",
        description="Verify DIR and write one self-contained HTML page (no scripts or external files) with the "
        "verification results, the loss curve, the genesis record and every ledger record; results of "
        "`replay --json` and `compare --out` can be attached.",
    )
    p.add_argument("run_dir", metavar="DIR", help="run directory (holds ledger.jsonl)")
    p.add_argument("--out", required=True, metavar="FILE.html", help="HTML file to write")
    p.add_argument("--replay-json", action="append", default=[], metavar="FILE",
                   help="output of `kmodel provenance replay --json` to include (repeatable)")
    p.add_argument("--compare-json", action="append", default=[], metavar="FILE",
                   help="output of `kmodel provenance compare --out` to include (repeatable)")
    _add_verify_options(p)
    p.set_defaults(func=_run_report)


def _read_json(path: str, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{what} {path} is not readable JSON: {error}") from None


def _run_report(args) -> int:
    from kmodel.provenance.report import write_report
    from kmodel.provenance.verify import failed

    replays = [r for path in args.replay_json for r in _read_json(path, "--replay-json")]
    comparisons = [_read_json(path, "--compare-json") for path in args.compare_json]
    checks = _verify(args)
    out = write_report(args.run_dir, args.out, checks=checks, replays=replays, comparisons=comparisons)
    print(f"wrote {out} ({'verification FAILED' if failed(checks) else 'verification passed'})")
    return 0


# --- signing ------------------------------------------------------------------------------------------


def _add_sign(commands) -> None:
    p = commands.add_parser(
        "sign",
        help="sign the ledger head with an ed25519 key (offline)",
        description="Sign the hash of the current last record of DIR/ledger.jsonl with an ed25519 private key (PEM) "
        "and write DIR/ledger.sig.json. The signature covers every record up to that head, since each record "
        "carries the hash of the one before. Needs the `cryptography` package.",
    )
    p.add_argument("run_dir", metavar="DIR", help="run directory (holds ledger.jsonl)")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="ed25519 private key (see `keygen`)")
    p.set_defaults(func=_run_sign)


def _run_sign(args) -> int:
    from kmodel.ledger import sign_ledger

    signature = sign_ledger(args.run_dir, args.key)
    print(f"signed record {signature['index']} ({signature['head_hash'][:16]}...) with key {signature['public_key']}")
    return 0


def _add_keygen(commands) -> None:
    p = commands.add_parser(
        "keygen",
        help="create an ed25519 signing key",
        description="Write a new ed25519 private key (PEM, readable by its owner only) and print its public key "
        "(hex), which graders pass to `verify --public-key`. Needs the `cryptography` package.",
    )
    p.add_argument("--out", required=True, metavar="KEY.pem", help="private key file to create (must not exist)")
    p.set_defaults(func=_run_keygen)


def _run_keygen(args) -> int:
    from kmodel.ledger import generate_key

    print(f"wrote {args.out}; public key {generate_key(args.out)}")
    return 0

