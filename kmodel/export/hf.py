"""Export a kmodel checkpoint to a Hugging Face transformers directory, streamed.

The families (what each transformers class can express, its config.json and names) live in
`kmodel/export/family.py` (the `Family` type, registry and shared pieces) and `kmodel/export/families.py`
(one entry per class); this module writes the directory. kmodel never imports transformers: the output is
plain JSON and safetensors that transformers' built-in classes load.

    config.json                         the family's config, special token ids
    model.safetensors                   when everything fits in one shard, else
    model-00001-of-0000N.safetensors    shards of at most --max-shard-size bytes (a bigger tensor alone)
    model.safetensors.index.json        {"metadata": {"total_size"}, "weight_map": {name: shard}}
    tokenizer files                     when the checkpoint has a tokenizer
    kmodel/config.yaml, kmodel/tokenizer/   the kmodel recipe and tokenizer, so `kmodel import hf` is exact

Tensors are read from the (verified) checkpoint, renamed, transformed and cast one at a time and written as
they come: the peak memory is about the largest tensor, never the model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kmodel.checkpoint import (
    TOKENIZER_DIR,
    LazyTensor,
    load_config_from_checkpoint,
    read_weights,
    resolve_checkpoint,
)
from kmodel.checkpoint.files import TensorStream, write_safetensors
from kmodel.config import Config
from kmodel.export import families  # noqa: F401  (registers the families)
from kmodel.export.family import FAMILIES, ExportError, Family, choose_family
from kmodel.rundir import CONFIG_FILE

__all__ = ["EXPORT_DTYPES", "FAMILIES", "ExportError", "Family", "choose_family", "export_hf", "parse_size"]

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_MAX_SHARD = "5GB"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
KMODEL_DIR = "kmodel"  # the recipe and tokenizer the export came from
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
        if match is None or match.group(2) not in SIZE_UNITS:
            raise ExportError(f"--max-shard-size {text!r} is not a size; give e.g. 5GB, 500MB, 2GiB or a byte count")
        size = int(float(match.group(1)) * SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ExportError(f"--max-shard-size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class Exported:
    """One tensor of the export: its Hugging Face name, the kmodel tensor it comes from, dtype and shape."""

    hf_name: str
    source: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def export_plan(weights: dict[str, LazyTensor], cfg: Config, family: Family, dtype: torch.dtype) -> list[Exported]:
    """What will be written, from the tensors' shapes alone (the family's transform runs on meta tensors)."""
    plan, seen = [], {}
    for name in sorted(weights):
        hf_name = family.rename(name, cfg.model)
        if hf_name is None:
            continue
        if hf_name in seen:
            raise ExportError(f"two kmodel tensors map to {hf_name}: {seen[hf_name]} and {name}")
        seen[hf_name] = name
        lazy = weights[name]
        shape = tuple(family.transform(name, torch.empty(lazy.shape, dtype=lazy.dtype, device="meta"), cfg.model).shape)
        plan.append(Exported(hf_name, name, dtype if lazy.dtype.is_floating_point else lazy.dtype, shape))
    return plan


def shard_plan(plan: list[Exported], max_bytes: int) -> list[list[Exported]]:
    """Consecutive groups of at most `max_bytes` (a tensor bigger than that is a shard of its own)."""
    shards: list[list[Exported]] = []
    size = 0
    for tensor in plan:
        if not shards or size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _stream(shard: list[Exported], weights: dict[str, LazyTensor], cfg: Config, family: Family) -> TensorStream:
    values = (family.transform(t.source, weights[t.source].load(), cfg.model).to(t.dtype).contiguous() for t in shard)
    return TensorStream([(t.hf_name, t.dtype, t.shape) for t in shard], values)


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    family: str | None = None,
    dtype: str = "bfloat16",
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
) -> str:
    """Write `out_dir` for transformers.AutoModelForCausalLM; returns the model_type used."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {out} is not empty")
    cfg = load_config_from_checkpoint(ckpt)
    chosen = choose_family(cfg.model, family)
    for note in chosen.notes(cfg.model):
        log.warning("export to %s %s", chosen.model_type, note)
    weights = read_weights(ckpt, lazy=True)
    shards = shard_plan(export_plan(weights, cfg, chosen, EXPORT_DTYPES[dtype]), max_bytes)

    tokenizer = None
    if (ckpt / TOKENIZER_DIR).is_dir():
        from kmodel.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(ckpt / TOKENIZER_DIR)
    config = {"model_type": chosen.model_type, "architectures": [chosen.architecture], **chosen.config_json(cfg)}
    # Without a tokenizer there are no special ids; an implicit pad id would freeze that embedding row.
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if tokenizer is not None else (None, None, None)
    config.update(zip(SPECIAL_IDS, special))

    out.mkdir(parents=True, exist_ok=True)
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(out / name, _stream(shard, weights, cfg, chosen))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
                 "weight_map": {t.hf_name: name for name, s in zip(names, shards) for t in s}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / KMODEL_DIR).mkdir()
    shutil.copyfile(ckpt / CONFIG_FILE, out / KMODEL_DIR / CONFIG_FILE)
    if tokenizer is not None:
        from kmodel.tokenizer.hf_export import export_hf_tokenizer

        export_hf_tokenizer(tokenizer, out)
        shutil.copytree(ckpt / TOKENIZER_DIR, out / KMODEL_DIR / TOKENIZER_DIR)
    return chosen.model_type
