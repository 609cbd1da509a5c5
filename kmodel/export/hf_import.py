"""`kmodel import hf HF_DIR --out CKPT`: a Hugging Face transformers directory back into a kmodel checkpoint, the
exact inverse of `kmodel export hf`, streamed one tensor at a time.

The model config comes from the export's `kmodel/config.yaml` (or `--recipe` for a directory kmodel did not
write); it must reproduce the directory's config.json through the family (so the names and layouts below are
the right ones), else the keys that differ are named. Each kmodel tensor is read under its family name and
undone from the family's layout: transforms are rearrangements of elements (transposes, interleaves), inverted
exactly through the permutation they apply to element indices. A buffer the family leaves out (a router bias it
does not use) starts at zero, as in a fresh model; a parameter without a name is refused. Floating-point tensors
take the kmodel dtype (bf16 -> fp32 is exact, so export -> import -> export gives the same bytes). The
checkpoint's manifest records the sha256 of every source file (`imported_from`), which the ledger of a run
started from it carries.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open

from kmodel.checkpoint import TOKENIZER_DIR, CheckpointError, TensorStream, save_checkpoint
from kmodel.config import ConfigError, config_from_dict, load_config
from kmodel.export import families  # noqa: F401  (registers the families)
from kmodel.export.family import FAMILIES, ExportError, Family
from kmodel.export.hf import INDEX_FILE, KMODEL_DIR, SINGLE_FILE, SPECIAL_IDS
from kmodel.hashing import sha256_file
from kmodel.rundir import CONFIG_FILE


def _source_files(hf: Path) -> dict[str, str]:
    """Hugging Face tensor name -> the file holding it."""
    if (hf / INDEX_FILE).is_file():
        try:
            return json.loads((hf / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as error:
            raise ExportError(f"{hf / INDEX_FILE} is not a safetensors index ({error})") from None
    if not (hf / SINGLE_FILE).is_file():
        raise ExportError(f"{hf} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    try:
        with safe_open(hf / SINGLE_FILE, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{hf / SINGLE_FILE} is not readable safetensors ({error})") from None


def _model_config(hf: Path, recipe: str | None):
    if recipe is not None:
        return load_config(recipe)
    path = hf / KMODEL_DIR / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{hf} has no {KMODEL_DIR}/{CONFIG_FILE} (kmodel did not export it); give --recipe RECIPE "
                          "whose model section describes this architecture")
    try:
        return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except (yaml.YAMLError, ConfigError) as error:
        raise ExportError(f"{path}: {error}") from None


def _check_config(hf_config: dict[str, Any], cfg, family: Family) -> None:
    problems = family.problems(cfg.model)
    if problems:
        raise ExportError(f"{family.model_type} cannot express this recipe's model: " + "; ".join(problems))
    expected = {"model_type": family.model_type, "architectures": [family.architecture], **family.config_json(cfg)}
    differ = [f"{k}: config.json has {hf_config.get(k)!r}, the recipe gives {v!r}" for k, v in expected.items()
              if k not in SPECIAL_IDS and hf_config.get(k) != v]
    if differ:
        raise ExportError("config.json does not describe this recipe's model (" + "; ".join(differ[:6]) + "); "
                          "give the --recipe of this model")


def untransform(family: Family, name: str, tensor: torch.Tensor, shape: tuple[int, ...], cfg) -> torch.Tensor:
    """The kmodel tensor of shape `shape` that the family's transform maps to `tensor` (which must only
    rearrange elements)."""
    positions = family.transform(name, torch.arange(math.prod(shape)).reshape(shape), cfg.model)
    if tuple(positions.shape) != tuple(tensor.shape):
        raise ExportError(f"{name}: the file holds shape {tuple(tensor.shape)}, the recipe's model needs "
                          f"{tuple(positions.shape)} in the {family.model_type} layout")
    positions = positions.reshape(-1)
    if not torch.equal(torch.sort(positions).values, torch.arange(positions.numel())):
        raise ExportError(f"{family.model_type}'s layout of {name} is not a rearrangement; it cannot be inverted")
    out = torch.empty(math.prod(shape), dtype=tensor.dtype)
    out[positions] = tensor.reshape(-1)
    return out.reshape(shape)


def import_hf(hf_dir: str | Path, out: str | Path, *, family: str | None = None, recipe: str | None = None) -> Path:
    """Write the checkpoint `out` (weights, config, tokenizer) from a transformers directory; returns it."""
    from kmodel.model import build_model

    hf = Path(hf_dir)
    try:
        hf_config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExportError(f"{hf / 'config.json'}: {error}") from None
    model_type = family or hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ExportError(f"{hf}: model_type {model_type!r} is not a family kmodel exports ({', '.join(sorted(FAMILIES))})")
    chosen = FAMILIES[model_type]
    cfg = _model_config(hf, recipe)
    _check_config(hf_config, cfg, chosen)
    files = _source_files(hf)

    meta = build_model(cfg, "meta", init=False)
    expected, parameters = meta.state_dict(), {name for name, _ in meta.named_parameters()}
    names = sorted(expected)
    mapped = {name: chosen.rename(name, cfg.model) for name in names}
    unnamed = [n for n in names if mapped[n] is None and n in parameters]
    if unnamed:
        raise ExportError(f"{model_type} has no names for {unnamed[:4]}{' ...' if len(unnamed) > 4 else ''}; "
                          "a checkpoint without them would not be this recipe's model")
    missing = [mapped[n] for n in names if mapped[n] is not None and mapped[n] not in files]
    if missing:
        raise ExportError(f"{hf} lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    extra = sorted(set(files) - set(mapped.values()))
    if extra:
        raise ExportError(f"{hf} holds tensors this recipe's model has no place for: {extra[:4]}")

    def values():
        for name in names:
            if mapped[name] is None:  # a buffer the family has no place for (a router bias it does not use)
                yield torch.zeros(expected[name].shape, dtype=expected[name].dtype)
                continue
            try:
                with safe_open(hf / files[mapped[name]], framework="pt") as f:
                    tensor = f.get_tensor(mapped[name])
            except (SafetensorError, OSError) as error:
                raise ExportError(f"{hf / files[mapped[name]]}: cannot read {mapped[name]}: {error}") from None
            tensor = untransform(chosen, name, tensor, tuple(expected[name].shape), cfg)
            yield tensor.to(expected[name].dtype)

    tokenizer = None
    if (hf / KMODEL_DIR / TOKENIZER_DIR).is_dir():
        from kmodel.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(hf / KMODEL_DIR / TOKENIZER_DIR)
    sources = {str(p.relative_to(hf)): sha256_file(p) for p in sorted(hf.rglob("*")) if p.is_file()}
    stream = TensorStream([(n, expected[n].dtype, tuple(expected[n].shape)) for n in names], values())
    try:
        save_checkpoint(out, stream, cfg, tokenizer=tokenizer,
                        extra={"imported_from": {"path": str(hf.resolve()), "format": "hf", "model_type": model_type,
                                                 "files": sources}})
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    return Path(out)
