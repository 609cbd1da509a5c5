"""Lower rooms never import higher ones (docs/architecture.md): the trainer and the engines write the ledger
through `kmodel.ledger`, below both them and `kmodel.provenance`, which reads it and sits above them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

KMODEL = Path(__file__).resolve().parents[1] / "kmodel"

# room (folder under kmodel/) -> packages it must not import, at module level or inside a function
FORBIDDEN = {
    "train": ("kmodel.provenance",),
    "parallel": ("kmodel.provenance",),
    "checkpoint": ("kmodel.provenance", "kmodel.train", "kmodel.parallel"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, relative imports resolved against its package."""
    package = ".".join(path.relative_to(KMODEL.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            # `from kmodel import provenance` imports the package kmodel.provenance
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return sorted(found)


def violations(room: str) -> list[str]:
    return [f"{path.relative_to(KMODEL.parent)}:{line} imports {module}"
            for path in sorted((KMODEL / room).rglob("*.py"))
            for line, module in imported_modules(path)
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[room])]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_does_not_import_higher_rooms(room):
    assert violations(room) == []


def test_the_scan_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The scan itself: an import inside a function, and a relative one, are both found."""
    package = tmp_path / "kmodel" / "train"
    package.mkdir(parents=True)
    (package / "sneaky.py").write_text("def f():\n    from kmodel.provenance.verify import verify_run\n"
                                       "from ..provenance import ledger\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "KMODEL", tmp_path / "kmodel")
    assert violations("train") == ["kmodel/train/sneaky.py:2 imports kmodel.provenance.verify.verify_run",
                                   "kmodel/train/sneaky.py:3 imports kmodel.provenance.ledger"]
