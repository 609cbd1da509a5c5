"""The data manifest: exactly which bytes a run trains and evaluates on.

    {"format": "kmodel-data-manifest/1",
     "sources": [{"name", "path", "weight", "text_key", "hub", "files": [{"path", "sha256", "bytes"}]}],
     "heldout": [{"path", "sha256", "bytes"}],
     "merkle_root": hex}

The Merkle root covers every listed file's content in order (training sources, then held-out files):
leaf = sha256(0x00 || file digest), parent = sha256(0x01 || left || right), an unpaired last node moves
up unchanged. Equal roots mean identical data in identical order; the provenance ledger records it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from kmodel.checkpoint import sha256_file
from kmodel.config import DataConfig
from kmodel.data.sources import DataError, read_hub_texts, resolve_source

MANIFEST_FORMAT = "kmodel-data-manifest/1"


def file_entry(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def merkle_root(digests: list[str]) -> str:
    level = [hashlib.sha256(b"\x00" + bytes.fromhex(d)).digest() for d in digests]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        paired = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        level = paired + level[len(paired) * 2 :]
    return level[0].hex()


def data_manifest(data: DataConfig) -> dict[str, Any]:
    """Hash every file the data section names; a missing or unreadable file raises DataError naming it."""
    sources = []
    for source in data.sources:
        resolved = resolve_source(source)
        files = resolved.files if resolved.hub_name is None else read_hub_texts(resolved.hub_name, source.text_key)[1]
        sources.append({
            "name": resolved.label,
            "path": source.path,
            "weight": source.weight,
            "text_key": source.text_key,
            "hub": resolved.hub_name is not None,
            "files": [file_entry(Path(f)) for f in files],
        })
    heldout = [file_entry(Path(p)) for p in data.heldout]
    digests = [f["sha256"] for s in sources for f in s["files"]] + [f["sha256"] for f in heldout]
    return {"format": MANIFEST_FORMAT, "sources": sources, "heldout": heldout, "merkle_root": merkle_root(digests)}


def manifest_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Files whose content differs between two manifests, for a clear refusal to resume on changed data."""
    def by_path(manifest):
        entries = [f for s in manifest["sources"] for f in s["files"]] + list(manifest["heldout"])
        return {f["path"]: f["sha256"] for f in entries}

    old, new = by_path(recorded), by_path(current)
    changed = [f"{p} (changed)" for p in old if p in new and old[p] != new[p]]
    changed += [f"{p} (gone)" for p in old if p not in new]
    changed += [f"{p} (new)" for p in new if p not in old]
    if not changed and recorded["merkle_root"] != current["merkle_root"]:
        changed.append("file order")
    return changed
