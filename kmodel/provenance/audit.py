"""`kmodel provenance audit`: does anything on the training path come from someone else's model?

Two looks, both reported finding by finding:

static    every Python file of the kmodel source tree (kmodel/, kernels/, tokenizer/) is parsed; imports of
          third-party model code (transformers, timm, peft, ...) and of weight hubs are listed, marked as
          on the training path when the module is reachable by imports from the trainer, and every call
          that loads weights (from_pretrained, torch.load, safetensors, hub downloads) is listed with the
          function it sits in; kmodel's own checkpoint readers, which read a run's own directories, are
          named as such.
runtime   (--run) a short training run and a resume of it execute in a child process with a Python audit
          hook that sees every file opened and every module imported; a weight-like file read from
          outside the run directory, or a model-code package imported, is a failure. safetensors reads
          files natively, out of the hook's sight, so its readers are wrapped to report their paths. The
          tokenized-data cache (kmodel's memory-mapped token shards) is reported as data.

The project's own declared dependencies (pyproject.toml) are listed with what they are for.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kmodel.data.shards import DOCS_SUFFIX, TOKENS_SUFFIX
from kmodel.ledger import SOURCE_DIRS, source_root
from kmodel.safe_path import python_command

# Packages that ship model architectures or pretrained weights.
MODEL_CODE_PACKAGES = {
    "transformers": "Hugging Face model classes",
    "timm": "pretrained vision models",
    "open_clip": "pretrained CLIP models",
    "sentence_transformers": "pretrained sentence encoders",
    "peft": "adapters on pretrained models",
    "diffusers": "pretrained diffusion models",
    "vllm": "inference engine with model implementations",
    "fairseq": "pretrained sequence models",
    "megatron": "Megatron model implementations",
    "keras_nlp": "pretrained Keras models",
    "keras_hub": "pretrained Keras models",
    "mlx_lm": "MLX model implementations",
    "trl": "training on pretrained models",
    "torchvision.models": "pretrained vision models",
    "torchaudio.models": "pretrained audio models",
    "huggingface_hub": "downloads from the Hugging Face Hub",
    "modelscope": "downloads from ModelScope",
}
# Calls that read weights; the attribute or function name is what is matched.
WEIGHT_LOADERS = {
    "from_pretrained": "pretrained weights",
    "hf_hub_download": "hub download",
    "snapshot_download": "hub download",
    "load_state_dict_from_url": "download of weights",
    "torch.hub.load": "torch hub model",
    "torch.load": "pickled tensors",
    "load_file": "safetensors file",
    "safe_open": "safetensors file",
}
# kmodel functions that read only a run's own checkpoint directories (paths the user passes in).
RUN_LOCAL_READERS = {
    ("kmodel/checkpoint/directory.py", "read_state"),
    ("kmodel/checkpoint/files.py", "load"),
    ("kmodel/checkpoint/files.py", "lazy_tensors"),
    ("kmodel/checkpoint/index.py", "load_flat"),
}
TRAINING_ENTRY_MODULES = ("kmodel.train.run", "kmodel.train.trainer", "kmodel.train.cli")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
                   ".npz", ".npy", ".pkl", ".pickle")
# The token cache's shard files (kmodel.data.shards): token ids and document offsets, reported as data.
TOKEN_SHARD_SUFFIXES = (TOKENS_SUFFIX, DOCS_SUFFIX)
# Source folders as import names (kmodel.kernels and kmodel.tokenizer live at the top of the checkout).
PACKAGE_OF_DIR = {"kmodel": "kmodel", "kernels": "kmodel.kernels", "tokenizer": "kmodel.tokenizer"}

PASS, FAIL, WARN, INFO = "pass", "fail", "warn", "info"


@dataclass
class Finding:
    status: str
    kind: str  # import, weight-load, dependency, runtime-file, runtime-import
    where: str  # file:line, or a path
    detail: str


# --- static ---------------------------------------------------------------------------------------------


def _module_name(root: Path, file: Path) -> str:
    rel = file.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGE_OF_DIR[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files(root: Path) -> dict[str, Path]:
    files = {}
    for folder in SOURCE_DIRS:
        for file in sorted((root / folder).rglob("*.py")):
            files[_module_name(root, file)] = file
    return files


def _resolve_relative(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, file: Path, tree: ast.AST) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement, function-level ones included."""
    found = []
    is_package = file.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, is_package, node)
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    # importlib.import_module("literal") calls
    for node in ast.walk(tree):
        literal = (isinstance(node, ast.Call) and _call_name(node.func).endswith("import_module") and node.args
                   and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))
        if literal:
            found.append((node.args[0].value, node.lineno))
    return found


def _call_name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        inner = _call_name(func.value)
        return f"{inner}.{func.attr}" if inner else func.attr
    return ""


def _model_package(name: str) -> str | None:
    for package in MODEL_CODE_PACKAGES:
        if name == package or name.startswith(package + "."):
            return package
    return None


def _enclosing_functions(tree: ast.AST) -> dict[int, str]:
    """Line -> name of the innermost function containing it."""
    lines = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                lines[line] = node.name  # inner functions are visited later and overwrite
    return lines


def training_path(graph: dict[str, set[str]]) -> set[str]:
    """kmodel modules reachable by imports from the trainer's entry modules."""
    seen, stack = set(), [m for m in TRAINING_ENTRY_MODULES if m in graph]
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        stack += [m for m in graph.get(module, ()) if m not in seen]
    return seen


def static_audit(root: Path | None = None) -> list[Finding]:
    root = source_root() if root is None else root
    files = _source_files(root)
    trees, imports = {}, {}
    for module, file in files.items():
        try:
            trees[module] = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        except SyntaxError as error:
            raise ValueError(f"cannot parse {file}: {error}") from None
        imports[module] = _imports(module, file, trees[module])
    graph = {}
    for module, found in imports.items():
        targets = set()
        for name, _ in found:
            # an import of a.b.c makes a, a.b and a.b.c run
            parts = name.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in files)
        graph[module] = targets
    on_path = training_path(graph)
    findings = []
    for module, found in imports.items():
        rel = files[module].relative_to(root)
        for name, line in found:
            package = _model_package(name)
            if package is None:
                continue
            where = f"{rel}:{line}"
            if module in on_path:
                findings.append(Finding(FAIL, "import", where, f"imports {name} ({MODEL_CODE_PACKAGES[package]}) on the training path"))
            else:
                findings.append(Finding(WARN, "import", where, f"imports {name} ({MODEL_CODE_PACKAGES[package]}); "
                                        "not reachable from the trainer"))
        findings += _weight_loads(trees[module], str(rel), module in on_path)
    if not any(f.kind == "import" and f.status == FAIL for f in findings):
        findings.append(Finding(PASS, "import", str(root), f"no import of third-party model code on the training path "
                                f"({len(on_path)} of {len(files)} modules are reachable from the trainer)"))
    return _dedupe(findings)


def _weight_loads(tree: ast.AST, rel: str, on_training_path: bool) -> list[Finding]:
    functions = _enclosing_functions(tree)
    findings = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node.func)
        loader = next((k for k in WEIGHT_LOADERS if name == k or name.endswith("." + k) or name.split(".")[-1] == k), None)
        if loader is None:
            continue
        function = functions.get(node.lineno, "<module>")
        where = f"{rel}:{node.lineno}"
        what = f"{name}() in {function}() loads {WEIGHT_LOADERS[loader]}"
        if (rel, function) in RUN_LOCAL_READERS:
            findings.append(Finding(PASS, "weight-load", where, what + ": kmodel's reader of a run's own checkpoints"))
        elif loader in ("from_pretrained", "hf_hub_download", "snapshot_download", "load_state_dict_from_url", "torch.hub.load"):
            findings.append(Finding(FAIL if on_training_path else WARN, "weight-load", where, what + " from outside the run"))
        else:
            place = "on the training path" if on_training_path else "off the training path"
            findings.append(Finding(INFO, "weight-load", where, f"{what} ({place}; the runtime audit checks what it reads)"))
    return findings


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen, unique = set(), []
    for f in findings:
        key = (f.status, f.kind, f.where, f.detail)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def dependency_findings(root: Path | None = None) -> list[Finding]:
    """The declared dependencies, and whether any of them is model code."""
    import tomllib

    root = source_root() if root is None else root
    path = root / "pyproject.toml"
    if not path.is_file():
        return [Finding(WARN, "dependency", str(path), "no pyproject.toml to read dependencies from")]
    project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
    findings = []
    groups = {"runtime": project.get("dependencies", []), **{f"extra [{k}]": v for k, v in project.get("optional-dependencies", {}).items()}}
    for group, requirements in groups.items():
        for requirement in requirements:
            name = requirement.split(";")[0].split("[")[0]
            for stop in "<>=!~ ":
                name = name.split(stop)[0]
            package = _model_package(name.replace("-", "_"))
            if package is None:
                continue
            status = FAIL if group == "runtime" else INFO
            findings.append(Finding(status, "dependency", f"pyproject.toml {group}", f"{requirement}: {MODEL_CODE_PACKAGES[package]}"
                                    + ("" if status == FAIL else "; not a runtime dependency (tests and comparisons only)")))
    if not any(f.status == FAIL for f in findings):
        findings.append(Finding(PASS, "dependency", "pyproject.toml", "no runtime dependency ships model code"))
    return findings


# --- runtime --------------------------------------------------------------------------------------------

# The child process. safetensors reads files from Rust, where Python's audit hook does not see them, so
# its entry points are wrapped to report their paths before kmodel imports (and binds) them.
_CHILD = """
import json, os, sys
import safetensors, safetensors.torch
native_reads = []
def _reporting(original):
    def reader(filename, *args, **kwargs):
        native_reads.append(os.path.abspath(os.fsdecode(filename)))
        return original(filename, *args, **kwargs)
    return reader
for _module, _name in ((safetensors, 'safe_open'), (safetensors.torch, 'safe_open'), (safetensors.torch, 'load_file')):
    setattr(_module, _name, _reporting(getattr(_module, _name)))
from kmodel.provenance.audit import runtime_probe
result = runtime_probe(*json.loads(sys.argv[1]))
result['opened'] = sorted(set(result['opened']) | set(native_reads))
print(json.dumps(result))
"""


def runtime_probe(recipe: str, overrides: list[str], steps: int, run_dir: str) -> dict[str, Any]:
    """Run in a child process: train `steps` steps, resume for `steps` more, and report every file opened
    for reading and every module imported meanwhile."""
    opened: set[str] = set()

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if "r" in mode or "+" in mode or (not mode and not flags & (os.O_WRONLY | os.O_RDWR)):
                opened.add(os.path.abspath(os.fsdecode(args[0])))

    before = set(sys.modules)
    sys.addaudithook(hook)
    from kmodel.config import load_config
    from kmodel.train import train

    # A few steps of the recipe: its warmup is shortened to fit them (a warmup past max_steps is refused).
    cfg = load_config(recipe, overrides + [f"train.checkpoint_every={steps}", "train.eval_every=0", "train.eval_batches=1",
                                           f"train.warmup_steps={steps}"])
    train(cfg, run_dir, max_steps=steps, progress=False)
    train(None, run_dir, resume=True, max_steps=2 * steps, progress=False)
    return {"opened": sorted(opened), "imported": sorted(set(sys.modules) - before)}


def runtime_audit(recipe: str, overrides: list[str], steps: int = 2, timeout: float = 1800) -> list[Finding]:
    from kmodel.data import default_cache_dir

    with tempfile.TemporaryDirectory(prefix="kmodel-audit-") as tmp:
        run_dir = Path(tmp) / "run"
        result = subprocess.run(
            python_command("-c", _CHILD, json.dumps([recipe, overrides, steps, str(run_dir)])),
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if result.returncode != 0:
            return [Finding(FAIL, "runtime-file", recipe, f"the audited training run failed: {result.stderr.strip()[-2000:]}")]
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        return classify_runtime(probe, run_dir, Path(default_cache_dir()) / "tokens")


def classify_runtime(probe: dict[str, Any], run_dir: Path, token_cache: Path) -> list[Finding]:
    """Findings from what the audited run opened and imported."""
    run_prefix = str(run_dir.resolve()) + os.sep
    cache_prefix = str(token_cache.resolve()) + os.sep
    findings = []
    for path in probe["opened"]:
        if path.startswith(cache_prefix) and path.endswith(TOKEN_SHARD_SUFFIXES):
            findings.append(Finding(INFO, "runtime-file", path, "tokenized-data cache (token ids, not weights)"))
        elif not path.endswith(WEIGHT_SUFFIXES):
            continue
        elif path.startswith(run_prefix):
            findings.append(Finding(PASS, "runtime-file", path, "read from the run's own directory"))
        else:
            findings.append(Finding(FAIL, "runtime-file", path, "weight-like file read from outside the run"))
    imported = [m for m in probe["imported"] if _model_package(m)]
    for module in imported:
        findings.append(Finding(FAIL, "runtime-import", module, f"imported during training ({MODEL_CODE_PACKAGES[_model_package(module)]})"))
    if not imported:
        findings.append(Finding(PASS, "runtime-import", "training run",
                                f"{len(probe['imported'])} modules imported while training and resuming; none is model code"))
    if not any(f.kind == "runtime-file" and f.status == FAIL for f in findings):
        findings.append(Finding(PASS, "runtime-file", "training run",
                                f"{len(probe['opened'])} files read; no weight file from outside the run"))
    return findings


def audit(root: Path | None = None, run_recipe: str | None = None, overrides: list[str] | None = None, steps: int = 2) -> list[Finding]:
    findings = static_audit(root) + dependency_findings(root)
    if run_recipe is not None:
        findings += runtime_audit(run_recipe, list(overrides or []), steps)
    return findings


def failed(findings: list[Finding]) -> bool:
    return any(f.status == FAIL for f in findings)


def format_findings(findings: list[Finding]) -> str:
    order = {FAIL: 0, WARN: 1, INFO: 2, PASS: 3}
    lines = [f"{f.status.upper():<5} {f.kind:<14} {f.where}: {f.detail}" for f in sorted(findings, key=lambda f: order[f.status])]
    counts = {s: sum(f.status == s for f in findings) for s in order}
    lines.append(f"\n{counts[FAIL]} failures, {counts[WARN]} warnings, {counts[INFO]} notes, {counts[PASS]} passes")
    return "\n".join(lines)


def findings_as_dicts(findings: list[Finding]) -> list[dict[str, str]]:
    return [asdict(f) for f in findings]
