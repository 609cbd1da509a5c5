"""Export a kmodel checkpoint to a Hugging Face transformers directory.

The families (what each transformers class can express, its config.json and names) live in
`kmodel/export/family.py` (the `Family` type, registry and shared pieces) and `kmodel/export/families.py`
(one entry per class); this module writes the directory. kmodel never imports transformers: the output is
plain JSON and safetensors that transformers' built-in classes load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from kmodel.checkpoint import TOKENIZER_DIR, load_config_from_checkpoint, read_weights, resolve_checkpoint
from kmodel.config import Config
from kmodel.export import families  # noqa: F401  (registers the families)
from kmodel.export.family import FAMILIES, ExportError, Family, choose_family

__all__ = ["FAMILIES", "ExportError", "Family", "choose_family", "export_hf", "hf_state_dict"]

log = logging.getLogger(__name__)


def hf_state_dict(weights: dict[str, torch.Tensor], cfg: Config, family: Family) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in weights.items():
        hf_name = family.rename(name, cfg.model)
        if hf_name is None:
            continue
        if hf_name in out:
            raise ExportError(f"two kmodel tensors map to {hf_name}")
        out[hf_name] = family.transform(name, tensor, cfg.model).contiguous()
    return out


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, family: str | None = None) -> str:
    """Write `out_dir` for transformers.AutoModelForCausalLM; returns the model_type used."""
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {out} is not empty")
    cfg = load_config_from_checkpoint(ckpt)
    chosen = choose_family(cfg.model, family)
    for note in chosen.notes(cfg.model):
        log.warning("export to %s %s", chosen.model_type, note)
    tensors = hf_state_dict(read_weights(ckpt), cfg, chosen)

    tokenizer = None
    if (ckpt / TOKENIZER_DIR).is_dir():
        from kmodel.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(ckpt / TOKENIZER_DIR)
    config = {"model_type": chosen.model_type, "architectures": [chosen.architecture], **chosen.config_json(cfg)}
    # Without a tokenizer there are no special ids; an implicit pad id would freeze that embedding row.
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if tokenizer is not None else (None, None, None)
    config.update(zip(("bos_token_id", "eos_token_id", "pad_token_id"), special))

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        from kmodel.tokenizer.hf_export import export_hf_tokenizer

        export_hf_tokenizer(tokenizer, out)
    return chosen.model_type

