"""What a forger does to a run's ledger, for the tests that show verify and replay catch it."""

from __future__ import annotations

import json
from pathlib import Path

from kmodel.ledger import record_hash
from kmodel.rundir import LEDGER_FILE


def rechain(run_dir: Path, records: list[dict]) -> None:
    """Write `records` back as a forger would: every index, link and hash made consistent again."""
    previous = "0" * 64
    for index, record in enumerate(records):
        record["index"], record["prev_hash"] = index, previous
        record["hash"] = record_hash(record)
        previous = record["hash"]
    lines = [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in records]
    (run_dir / LEDGER_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
