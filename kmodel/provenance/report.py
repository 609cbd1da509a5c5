"""`kmodel provenance report DIR --out FILE.html`: one self-contained page for a grader.

The page holds the verification results (run when the report is made), the genesis record (code,
config, environment, tokenizer, data files, seed, initial-weights hash), every ledger record, the loss
curve (metrics.jsonl, with the ledger's checkpoints marked) drawn as inline SVG, and optionally the
JSON output of `replay --json` and `compare --json`. No scripts, no external files.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from pathlib import Path
from typing import Any

from kmodel.ledger import LedgerError, checkpoint_records, read_records
from kmodel.provenance.verify import FAIL, PASS, SKIP, WARN, Check, verify_run
from kmodel.rundir import METRICS_FILE

STATUS_COLOURS = {PASS: "#1a7f37", FAIL: "#cf222e", WARN: "#9a6700", SKIP: "#57606a"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #1f2328; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; }
th { background: #f6f8fa; } code, pre { font-family: ui-monospace, monospace; font-size: 0.85em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; } .status { font-weight: bold; }
.verdict { font-size: 1.2em; padding: 0.6em 1em; border-radius: 6px; display: inline-block; color: white; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _short(digest: Any) -> str:
    return f"<code title='{_e(digest)}'>{_e(str(digest)[:12])}</code>" if digest else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _loss_points(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train" and isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"]):
            points.append((row["step"], float(row["loss"])))
    return points


def loss_svg(curve: list[tuple[int, float]], marks: list[tuple[int, float]], width: int = 900, height: int = 320) -> str:
    """Loss against step as an inline SVG polyline, ledger checkpoints as dots."""
    points = curve + marks
    if not points:
        return "<p>No losses were logged.</p>"
    pad = 50
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    y0, y1 = min(losses), max(losses) if max(losses) > min(losses) else min(losses) + 1

    def x(step: float) -> float:
        return pad + (step - x0) / (x1 - x0) * (width - 2 * pad)

    def y(loss: float) -> float:
        return height - pad - (loss - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' aria-label='loss curve'>",
             f"<rect x='0' y='0' width='{width}' height='{height}' fill='white' stroke='#d0d7de'/>"]
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        parts.append(f"<line x1='{pad}' x2='{width - pad}' y1='{y(value):.1f}' y2='{y(value):.1f}' stroke='#eaeef2'/>")
        parts.append(f"<text x='5' y='{y(value) + 4:.1f}' font-size='11'>{value:.3f}</text>")
    for i in range(5):
        step = x0 + (x1 - x0) * i / 4
        parts.append(f"<text x='{x(step) - 10:.1f}' y='{height - pad + 18}' font-size='11'>{step:.0f}</text>")
    parts.append(f"<text x='{width / 2 - 15:.0f}' y='{height - 8}' font-size='12'>step</text>")
    if curve:
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in curve)
        parts.append(f"<polyline points='{line}' fill='none' stroke='#0969da' stroke-width='1.5'/>")
    for s, v in marks:
        parts.append(f"<circle cx='{x(s):.1f}' cy='{y(v):.1f}' r='4' fill='#cf222e'><title>checkpoint {s}: loss {v}</title></circle>")
    parts.append("</svg>")
    return "".join(parts)


def _checks_section(checks: list[Check]) -> str:
    rows = [[f"<span class='status' style='color:{STATUS_COLOURS[c.status]}'>{c.status.upper()}</span>", _e(c.name), _e(c.reason)]
            for c in checks]
    return _table(["status", "check", "reason"], rows)


def _genesis_section(genesis: dict[str, Any]) -> str:
    code = genesis.get("code") or {}
    env = genesis.get("environment") or {}
    manifest = genesis.get("data_manifest") or {}
    rows = [
        ["run", _e(genesis.get("run"))],
        ["started", _e(genesis.get("time"))],
        ["code commit", _e(code.get("commit")) + (f" (uncommitted changes, diff sha256 {_short(code.get('diff_sha256'))})" if code.get("dirty") else "")],
        ["config sha256", _short(genesis.get("config_sha256"))],
        ["seed", _e(genesis.get("seed"))],
        ["initial weights sha256", _short(genesis.get("init_weights_sha256"))],
        ["tokenizer sha256", _short(genesis.get("tokenizer_sha256"))],
        ["data Merkle root", _short(manifest.get("merkle_root"))],
    ]
    out = _table(["field", "value"], rows)
    out += "<h3>Environment</h3>" + _table(["key", "value"], [[_e(k), _e(v)] for k, v in sorted(env.items())])
    files = [[_e(source.get("name")), _e(f["path"]), _short(f["sha256"]), _e(f["bytes"])]
             for source in manifest.get("sources", []) for f in source.get("files", [])]
    files += [["held-out", _e(f["path"]), _short(f["sha256"]), _e(f["bytes"])] for f in manifest.get("heldout", [])]
    if files:
        out += "<h3>Data files</h3>" + _table(["source", "path", "sha256", "bytes"], files)
    if genesis.get("config") is not None:
        out += "<details><summary>Resolved config</summary><pre>" + _e(json.dumps(genesis["config"], indent=1)) + "</pre></details>"
    return out


def _records_section(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        rows.append([
            _e(r.get("index")), _e(r.get("kind")), _e(r.get("step", "")), _e(r.get("time", "")),
            _e(r.get("loss", "")), _e(r.get("lr", "")), _e(r.get("grad_norm", "")),
            _e(r.get("batches", "")), _e(r.get("tokens", "")), _short(r.get("batch_digest")),
            _short(r.get("weights_sha256")), _short(r.get("optimizer_sha256")), _short(r.get("rng_sha256")),
            _short(r.get("prev_hash")), _short(r.get("hash")),
        ])
    return _table(["#", "kind", "step", "time", "loss", "lr", "grad norm", "batches", "tokens", "batch digest",
                   "weights", "optimizer", "RNG", "prev hash", "hash"], rows)


def _replay_section(replays: list[dict[str, Any]]) -> str:
    rows = []
    for result in replays:
        for c in result.get("checkpoints", []):
            differing = [k for k, ok in c["matches"].items() if not ok]
            rows.append([_e(f"{result['from_step']} -> {c['step']}"), _e(result["device"]),
                         (f"<span class='status' style='color:{STATUS_COLOURS[PASS if c['passed'] else FAIL]}'>"
                          f"{'PASS' if c['passed'] else 'FAIL'}</span>"),
                         _e("bit-identical" if not differing else "differs: " + ", ".join(differing)),
                         _e(c.get("weight_distance") if c.get("weight_distance") is not None else "")])
    return _table(["segment", "device", "result", "detail", "relative weight distance"], rows)


def _compare_section(report: dict[str, Any]) -> str:
    verdict = "DERIVED" if report["derived"] else "no evidence of derivation"
    head = (f"<p><b>{_e(report['a'])}</b> vs <b>{_e(report['b'])}</b>: {_e(verdict)} "
            f"(overall log10 p = {report['log10_p']:.1f}, alpha = {report['alpha']:g})</p>")
    rows = [[_e(m["module"]), _e(m["kind"]), _e(f"{m['log10_p']:.1f}"), _e(m["alignment"]),
             "shared" if m["module"] in report["shared_modules"] else ""] for m in report["modules"]]
    return head + _table(["module", "kind", "log10 p", "alignment", ""], rows)


def render_report(
    run_dir: str | Path,
    *,
    checks: list[Check] | None = None,
    replays: list[dict[str, Any]] | None = None,
    comparisons: list[dict[str, Any]] | None = None,
) -> str:
    """The HTML page for a run (verification is run here unless `checks` are given)."""
    run_dir = Path(run_dir)
    checks = verify_run(run_dir) if checks is None else checks
    try:
        records, _ = read_records(run_dir)
    except LedgerError:
        records = []
    failed = any(c.status == FAIL for c in checks)
    verdict = ("<span class='verdict' style='background:#cf222e'>verification FAILED</span>" if failed
               else "<span class='verdict' style='background:#1a7f37'>verification passed</span>")
    marks = [(r["step"], r["loss"]) for r in checkpoint_records(records) if isinstance(r.get("loss"), (int, float))]
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    body = [
        f"<h1>kmodel provenance report: {_e(run_dir)}</h1>",
        f"<p>Generated {generated} by <code>kmodel provenance report</code>. {verdict}</p>",
        "<h2>Verification</h2>", _checks_section(checks),
        "<h2>Loss</h2>", loss_svg(_loss_points(run_dir), marks),
        "<p>Blue: training loss from metrics.jsonl. Red dots: losses pinned in the ledger at checkpoints.</p>",
    ]
    if replays:
        body += ["<h2>Replays</h2>", _replay_section(replays)]
    for report in comparisons or []:
        body += ["<h2>Derivation test</h2>", _compare_section(report)]
    if records and records[0].get("kind") == "genesis":
        body += ["<h2>Genesis</h2>", _genesis_section(records[0])]
    body += ["<h2>Ledger records</h2>", _records_section(records) if records else "<p>No readable ledger.</p>"]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>kmodel provenance: {_e(run_dir.name)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")


def write_report(run_dir: str | Path, out: str | Path, **options) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(run_dir, **options), encoding="utf-8")
    return out
