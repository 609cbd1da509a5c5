"""A model's weights seen module by module, whatever wrote them.

`load_view(path)` reads a kmodel checkpoint (model.safetensors + config.yaml) or a Hugging Face directory
(config.json + one or more *.safetensors) and maps tensor names of both into one layout, so the derivation
test compares like with like:

    embed, lm_head     (vocab, hidden)
    attention          q (heads, head_dim, hidden), k / v (kv_heads, head_dim, hidden), o (heads, hidden, head_dim)
    dense MLP          gate / up (inter, hidden), down (hidden, inter)
    routed experts     gate / up (experts, inter, hidden), down (experts, hidden, inter)
    router             (experts, hidden)
    shared experts     a dense MLP

Fused layouts (`experts.gate_up_proj`, a dense `gate_up_proj`) and per-expert tensors
(`experts.N.gate_proj.weight`) are both understood; a leading `model.` is dropped. Norm weights are
deliberately not used (their cosine similarity is near 1 for unrelated models). Tensors that map to
nothing are listed in `unmapped`, so a reader sees what was not compared.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open

from kmodel.checkpoint import MANIFEST_FILE, MODEL_FILE, TOKENIZER_DIR, CheckpointError, read_weights
from kmodel.rundir import CONFIG_FILE


class ViewError(ValueError):
    """A directory that holds no readable model weights, or weights that do not fit their config."""


@dataclass
class AttentionWeights:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor


@dataclass
class MlpWeights:
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class ExpertWeights:
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class LayerWeights:
    attention: AttentionWeights | None = None
    mlp: MlpWeights | None = None
    router: torch.Tensor | None = None
    experts: ExpertWeights | None = None
    shared: MlpWeights | None = None


@dataclass
class ModelView:
    source: str
    format: str  # "kmodel" or "hf"
    hidden_size: int
    embed: torch.Tensor | None
    lm_head: torch.Tensor | None
    layers: dict[str, LayerWeights]
    tokenizer_path: Path | None
    unmapped: list[str] = field(default_factory=list)


# Norm weights and router correction biases carry no evidence of shared initialisation.
_IGNORED = re.compile(r"(norm|layernorm)\.weight$|e_score_correction_bias$|\.bias$")
_LAYER = re.compile(r"^(?:layers\.(\d+)|(mtp\.\d+)\.block)\.(.+)$")  # MTP depth k: "mtp.k"
_NAME_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def _common_name(name: str) -> str:
    for prefix in _NAME_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise ViewError(f"cannot read {file}: {error}") from None
    return tensors


def _attention_shape(config: dict, hidden: int) -> tuple[int, int, int]:
    heads = config.get("num_attention_heads")
    if not heads:
        raise ViewError("the config has no num_attention_heads; cannot split attention into heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return heads, kv_heads, head_dim


def load_view(path: str | Path) -> ModelView:
    """The weights under `path`: a kmodel checkpoint directory or a Hugging Face safetensors directory."""
    path = Path(path)
    if not path.is_dir():
        raise ViewError(f"{path} is not a directory (expected a kmodel checkpoint or a Hugging Face model directory)")
    if ((path / MANIFEST_FILE).is_file() or (path / MODEL_FILE).is_file()) and (path / CONFIG_FILE).is_file():
        fmt = "kmodel"
        config = (yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8")) or {}).get("model", {})
        try:  # verified against the manifest, either layout (one file or shards)
            weights = read_weights(path)
        except CheckpointError as error:
            raise ViewError(str(error)) from None
        tensors = {_common_name(n): t for n, t in weights.items()}
    elif (path / "config.json").is_file():
        fmt = "hf"
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ViewError(f"{path} has config.json but no *.safetensors files")
        tensors = {_common_name(n): t for n, t in _read_safetensors(files).items()}
    else:
        raise ViewError(f"{path} has neither model.safetensors + config.yaml (kmodel) nor config.json (Hugging Face)")
    tokenizer = next((p for p in (path / TOKENIZER_DIR, path) if _has_tokenizer(p)), None)
    return view_from_state(str(path), fmt, config, tensors, tokenizer)


def _has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any(
        (directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )


def view_from_state(source: str, fmt: str, config: dict, tensors: dict[str, torch.Tensor], tokenizer: Path | None) -> ModelView:
    embed = tensors.pop("embed_tokens.weight", None)
    lm_head = tensors.pop("lm_head.weight", None)
    hidden = config.get("hidden_size") or (embed.shape[1] if embed is not None else None)
    if hidden is None:
        raise ViewError(f"{source}: cannot tell the hidden size (no hidden_size in the config and no embedding)")
    unmapped = []
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _LAYER.match(name)
        if _IGNORED.search(name):
            continue
        if match is None:
            unmapped.append(name)
            continue
        layer = f"layers.{match.group(1)}" if match.group(1) is not None else match.group(2)
        grouped.setdefault(layer, {})[match.group(3)] = tensor
    layers = {}
    for layer, parts in sorted(grouped.items(), key=lambda item: _layer_order(item[0])):
        weights, leftover = _layer_weights(parts, config, hidden, f"{source}: {layer}")
        layers[layer] = weights
        unmapped.extend(f"{layer}.{rest}" for rest in leftover)
    return ModelView(source, fmt, hidden, _f32(embed), _f32(lm_head), layers, tokenizer, sorted(unmapped))


def _layer_order(name: str) -> tuple[int, int]:
    return (1 if name.startswith("mtp.") else 0, int(name.split(".")[1]))


def _f32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(torch.float32)


def _layer_weights(parts: dict[str, torch.Tensor], config: dict, hidden: int, where: str) -> tuple[LayerWeights, list[str]]:
    parts = {name: _f32(t) for name, t in parts.items()}
    layer = LayerWeights()
    attn_names = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    if all(n in parts for n in attn_names):
        heads, kv_heads, head_dim = _attention_shape(config, hidden)
        q, k, v, o = (parts.pop(n) for n in attn_names)
        expected = {"q": (heads * head_dim, hidden), "k": (kv_heads * head_dim, hidden),
                    "v": (kv_heads * head_dim, hidden), "o": (hidden, heads * head_dim)}
        for label, tensor in zip("qkvo", (q, k, v, o)):
            if tuple(tensor.shape) != expected[label]:
                raise ViewError(f"{where}: {label}_proj has shape {tuple(tensor.shape)}, config implies {expected[label]}")
        layer.attention = AttentionWeights(
            q=q.view(heads, head_dim, hidden),
            k=k.view(kv_heads, head_dim, hidden),
            v=v.view(kv_heads, head_dim, hidden),
            o=o.view(hidden, heads, head_dim).permute(1, 0, 2).contiguous(),
        )
    layer.mlp = _dense_mlp(parts, "mlp.")
    layer.shared = _dense_mlp(parts, "mlp.shared_experts.") or _dense_mlp(parts, "mlp.shared_expert.")
    if "mlp.gate.weight" in parts:
        layer.router = parts.pop("mlp.gate.weight")
    layer.experts = _experts(parts, where)
    return layer, sorted(parts)


def _dense_mlp(parts: dict[str, torch.Tensor], prefix: str) -> MlpWeights | None:
    names = [f"{prefix}{p}_proj.weight" for p in ("gate", "up", "down")]
    if all(n in parts for n in names):
        gate, up, down = (parts.pop(n) for n in names)
        return MlpWeights(gate, up, down)
    fused = f"{prefix}gate_up_proj.weight"
    if fused in parts and names[2] in parts:
        gate, up = parts.pop(fused).chunk(2, dim=0)
        return MlpWeights(gate, up, parts.pop(names[2]))
    return None


_PER_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def _experts(parts: dict[str, torch.Tensor], where: str) -> ExpertWeights | None:
    if "mlp.experts.gate_up_proj" in parts and "mlp.experts.down_proj" in parts:
        gate, up = parts.pop("mlp.experts.gate_up_proj").chunk(2, dim=1)
        return ExpertWeights(gate.contiguous(), up.contiguous(), parts.pop("mlp.experts.down_proj"))
    per_expert: dict[int, dict[str, torch.Tensor]] = {}
    for name in [n for n in parts if _PER_EXPERT.match(n)]:
        index, proj = _PER_EXPERT.match(name).groups()
        per_expert.setdefault(int(index), {})[proj] = parts.pop(name)
    if not per_expert:
        return None
    if sorted(per_expert) != list(range(len(per_expert))) or any(len(p) != 3 for p in per_expert.values()):
        raise ViewError(f"{where}: per-expert tensors are incomplete (experts {sorted(per_expert)})")
    ordered = [per_expert[i] for i in range(len(per_expert))]
    return ExpertWeights(*(torch.stack([e[p] for e in ordered]) for p in ("gate", "up", "down")))
