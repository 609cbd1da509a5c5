"""The data manifest: exactly which bytes a run trains and evaluates on, identified by content.

    {"format": "kmodel-data-manifest/1",
     "sources": [{"name", "path", "weight", "text_key", "files": [{"path", "sha256", "bytes"}]}],
     "heldout": [{"path", "sha256", "bytes"}],
     "merkle_root": hex,
     "prepared": {"path", "manifest_sha256", "shards_root", "content_key"}   (with data.prepared)}

With `data.prepared` the source hashes come from the prepared directory's manifest (nothing is re-hashed,
so start-up does not grow with the corpus); otherwise every source file is hashed. The Merkle root
(kmodel.hashing.merkle_root) covers every file's content in order, training sources then held-out files;
the provenance ledger records it. Paths are where the data was found, not what it is: two manifests name
the same data when their sources' names, text keys and file hashes agree, wherever the files now live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kmodel.config import DataConfig
from kmodel.data.prepare import hashed_sources
from kmodel.data.shards import PreparedData
from kmodel.data.sources import DataError
from kmodel.hashing import merkle_root, sha256_file

MANIFEST_FORMAT = "kmodel-data-manifest/1"


def file_entry(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def data_manifest(data: DataConfig) -> dict[str, Any]:
    """The data section's manifest; a missing or unreadable file raises DataError naming it."""
    heldout = [file_entry(Path(p)) for p in data.heldout]
    prepared = None
    if data.prepared is not None:
        prepared_data = PreparedData(data.prepared)
        weights = {s.name or s.path: s.weight for s in data.sources}
        held = prepared_data.source_names()
        for name in weights:
            if name not in held:
                raise DataError(f"data.sources names {name!r}, which data.prepared {prepared_data.directory} does not "
                                f"hold (it holds {', '.join(map(repr, held))})")
        sources = [{k: s[k] for k in ("name", "path", "text_key", "files")} | {"weight": weights.get(s["name"], s["weight"])}
                   for s in prepared_data.sources if not weights or s["name"] in weights]
        manifest = prepared_data.manifest
        prepared = {"path": str(prepared_data.directory), "manifest_sha256": prepared_data.sha256,
                    "shards_root": manifest["shards_root"], "content_key": manifest["content_key"]}
    else:
        sources = hashed_sources(data.sources)
    manifest = {"format": MANIFEST_FORMAT, "sources": sources, "heldout": heldout}
    manifest["merkle_root"] = _root(manifest)
    if prepared is not None:
        manifest["prepared"] = prepared
    return manifest


def _root(manifest: dict[str, Any]) -> str:
    """Merkle root over the source files then the held-out files (a Hub source not yet read has no hash)."""
    digests = [f["sha256"] for s in manifest["sources"] for f in s["files"]] + [f["sha256"] for f in manifest["heldout"]]
    return merkle_root([d for d in digests if d is not None])


def with_prepared_hashes(manifest: dict[str, Any], prepared: dict[str, Any]) -> None:
    """Fill in, from the prepared manifest, the hashes of Hub sources that were hashed as they were read."""
    by_name = {s["name"]: s["files"] for s in prepared["sources"]}
    for source in manifest["sources"]:
        if any(f["sha256"] is None for f in source["files"]) and source["name"] in by_name:
            source["files"] = [dict(f) for f in by_name[source["name"]]]
    manifest["merkle_root"] = _root(manifest)


def _content(manifest: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    return {s["name"]: (s["text_key"], [f["sha256"] for f in s["files"]]) for s in manifest["sources"]}


def manifest_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the data's content differs between two manifests (empty when only locations moved), for a clear
    refusal to resume on changed data."""
    old, new = _content(recorded), _content(current)
    changed = [f"source {name!r} (gone)" for name in old if name not in new]
    changed += [f"source {name!r} (new)" for name in new if name not in old]
    for name in old.keys() & new.keys():
        (old_key, old_files), (new_key, new_files) = old[name], new[name]
        if old_key != new_key:
            changed.append(f"source {name!r}: text_key {old_key!r} -> {new_key!r}")
        elif old_files != new_files:
            paths = [f["path"] for s in recorded["sources"] if s["name"] == name for f in s["files"]]
            moved = [p for p, digest in zip(paths, old_files) if digest not in new_files]
            changed.append(f"source {name!r}: " + (", ".join(f"{p} (changed)" for p in moved) if moved else
                                                  f"files reordered or added ({len(old_files)} -> {len(new_files)})"))
    old_heldout = [f["sha256"] for f in recorded["heldout"]]
    new_heldout = [f["sha256"] for f in current["heldout"]]
    if old_heldout != new_heldout:
        changed += [f"{f['path']} (changed)" for f in recorded["heldout"] if f["sha256"] not in new_heldout] or ["held-out files"]
    return changed


def relocations(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Files whose content is unchanged but found at another path ("old -> new")."""
    def paths(manifest):
        entries = [f for s in manifest["sources"] for f in s["files"]] + list(manifest["heldout"])
        return {f["sha256"]: f["path"] for f in entries}

    old, new = paths(recorded), paths(current)
    return [f"{old[d]} -> {new[d]}" for d in old if d in new and old[d] != new[d]]


def without_locations(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without where its data lives (source paths, held-out paths, data.prepared), for comparing
    recipes on resume: the same bytes may be found elsewhere, and their content is checked against the
    checkpoint's data manifest instead (manifest_differences)."""
    data = config.get("data")
    if not data:
        return config
    data = {**data, "prepared": None, "heldout": len(data.get("heldout") or []),
            "sources": [{**source, "path": None} for source in data.get("sources") or []]}
    return {**config, "data": data}
