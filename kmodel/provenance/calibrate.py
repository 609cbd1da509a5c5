"""Calibration of the derivation test on tiny kmodel models (CPU): null pairs and derived pairs.

    python -P -m kmodel.provenance.calibrate --models 30 --out bench/results/provenance_calibration

Null pairs: two models with different seeds, each trained for real (AdamW, a few dozen steps on the
bundled corpus, each with its own data order). Derived pairs start from a trained model A and apply what
a copier would: continued training, fine-tuning on other data with a large learning rate, function-
preserving permutations of MLP units / heads / experts / residual dimensions with sign flips and
rescaling, a copied embedding or a single copied layer (the rest trained from another seed), an extended
vocabulary. The permutation and rescaling transforms are checked to leave the model's outputs unchanged.
The tests in tests/provenance use the same builders with fewer pairs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from kmodel.config import Config, load_config
from kmodel.model import build_model
from kmodel.provenance.compare import DEFAULT_ALPHA, compare_views
from kmodel.provenance.views import ModelView, view_from_state

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny-ko-moe.yaml"
CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus" / "train"
# Smaller than the README's tiny model so that dozens of models train in minutes on 2 cores. The bundled
# corpus is tokenized with the shipped 8192-token tokenizer and its ids folded into 1024 (id mod 1024).
TINY_OVERRIDES = [
    "model.vocab_size=1024",
    "model.hidden_size=64",
    "model.intermediate_size=192",
    "model.moe_intermediate_size=48",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.head_dim=16",
    "model.num_hidden_layers=4",
    "model.num_experts=8",
    "model.sliding_window=32",
]
SEQ_LEN = 64
BATCH = 8


def tiny_config(seed: int, extra: list[str] | None = None) -> Config:
    return load_config(RECIPE, TINY_OVERRIDES + [f"seed={seed}"] + list(extra or []))


@lru_cache(maxsize=4)
def corpus_tokens(source: str, limit: int = 200_000) -> torch.Tensor:
    """Token ids of one bundled corpus file (ko_libreoffice_help, en_python_docs, code_python_stdlib)."""
    from kmodel.tokenizer import SHIPPED_TOKENIZER, Tokenizer

    tokenizer = Tokenizer.load(SHIPPED_TOKENIZER)
    ids: list[int] = []
    with open(CORPUS / f"{source}.jsonl", encoding="utf-8") as f:
        for line in f:
            ids.extend(tokenizer.encode(json.loads(line)["text"], add_eos=True))
            if len(ids) >= limit:
                break
    return torch.tensor(ids[:limit], dtype=torch.long)


def train_briefly(model, tokens: torch.Tensor, steps: int, lr: float, seed: int) -> list[float]:
    """Real AdamW steps on random windows of `tokens`; returns the losses. Ids beyond a small test
    vocabulary are folded into it (id mod vocab_size), which keeps the skewed token frequencies."""
    generator = torch.Generator().manual_seed(seed)
    tokens = tokens % model.cfg.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (BATCH,), generator=generator)
        window = torch.stack([tokens[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        out = model(window[:, :-1], labels=window[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.end_step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def trained_model(seed: int, steps: int, source: str = "ko_libreoffice_help", lr: float = 3e-3,
                  extra: list[str] | None = None):
    cfg = tiny_config(seed, extra)
    model = build_model(cfg)
    train_briefly(model, corpus_tokens(source), steps, lr, seed=seed + 10_000)
    return cfg, model


def view_of(model, cfg: Config, label: str) -> ModelView:
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return view_from_state(label, "kmodel", cfg.model.model_dump(), state, None)


# --- function-preserving transforms (kmodel parameter names, in place on a state dict) --------------


def _hidden_axes(name: str, tensor: torch.Tensor, hidden: int) -> list[int]:
    """Axes of `tensor` that index the residual stream (hidden_size), by what the parameter does."""
    if name.endswith("norm.weight"):
        return [0] if tensor.shape[0] == hidden else []  # q_norm / k_norm act on head_dim
    if name.endswith(("o_proj.weight", "down_proj.weight")) and tensor.dim() == 2:
        return [0]
    if name.endswith("experts.down_proj"):
        return [1]
    if name.endswith("experts.gate_up_proj"):
        return [2]
    if name.endswith("eh_proj.weight"):
        return [0, 1]
    if name.endswith(("embed_tokens.weight", "lm_head.weight", "_proj.weight", "gate.weight")):
        return [1]
    return []


def permute_residual(state: dict[str, torch.Tensor], hidden: int, generator: torch.Generator) -> None:
    """Permute the residual stream and flip the sign of some of its dimensions. Norms are sign-blind
    (RMSNorm keeps the sign of its input), so norm weights are permuted but never negated."""
    order = torch.randperm(hidden, generator=generator)
    signs = torch.where(torch.rand(hidden, generator=generator) < 0.5, -1.0, 1.0)
    for name, tensor in state.items():
        for axis in _hidden_axes(name, tensor, hidden):
            if tensor.shape[axis] == 2 * hidden:  # eh_proj reads [hidden state, embedding]
                full_order = torch.cat((order, order + hidden))
                full_signs = torch.cat((signs, signs))
            else:
                full_order, full_signs = order, signs
            shape = [1] * tensor.dim()
            shape[axis] = -1
            tensor = tensor.index_select(axis, full_order)
            if not name.endswith("norm.weight"):
                tensor = tensor * full_signs.view(shape)
        state[name] = tensor


def permute_mlp_units(state: dict[str, torch.Tensor], generator: torch.Generator, scale: bool = True) -> None:
    """Permute the hidden units of every dense MLP, shared expert and routed expert; with `scale`, also
    multiply each unit's up row by c and divide its down column by c (SwiGLU is linear in `up`)."""
    for name in [n for n in state if n.endswith(("mlp.gate_proj.weight", "shared_experts.gate_proj.weight"))]:
        prefix = name[: -len("gate_proj.weight")]
        units = state[name].shape[0]
        order = torch.randperm(units, generator=generator)
        c = torch.exp(torch.randn(units, generator=generator)) if scale else torch.ones(units)
        state[prefix + "gate_proj.weight"] = state[prefix + "gate_proj.weight"][order]
        state[prefix + "up_proj.weight"] = state[prefix + "up_proj.weight"][order] * c[:, None]
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, order] / c[None, :]
    for name in [n for n in state if n.endswith("experts.gate_up_proj")]:
        prefix = name[: -len("gate_up_proj")]
        gate_up, down = state[name].clone(), state[prefix + "down_proj"].clone()
        experts, units = down.shape[0], down.shape[2]
        for e in range(experts):
            order = torch.randperm(units, generator=generator)
            c = torch.exp(torch.randn(units, generator=generator)) if scale else torch.ones(units)
            gate_up[e, :units] = state[name][e, :units][order]
            gate_up[e, units:] = state[name][e, units:][order] * c[:, None]
            down[e] = state[prefix + "down_proj"][e][:, order] / c[None, :]
        state[name], state[prefix + "down_proj"] = gate_up, down


def permute_experts(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    for name in [n for n in state if n.endswith("mlp.gate.weight")]:
        prefix = name[: -len("gate.weight")]
        order = torch.randperm(state[name].shape[0], generator=generator)
        for part in ("gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj"):
            if prefix + part in state:
                state[prefix + part] = state[prefix + part][order]


def permute_heads(state: dict[str, torch.Tensor], cfg: Config, generator: torch.Generator) -> None:
    """Permute key-value heads together with their query groups, and query heads within each group."""
    heads, kv_heads, head_dim = cfg.model.num_attention_heads, cfg.model.num_key_value_heads, cfg.model.head_dim
    group = heads // kv_heads
    for name in [n for n in state if n.endswith("self_attn.q_proj.weight")]:
        prefix = name[: -len("q_proj.weight")]
        kv_order = torch.randperm(kv_heads, generator=generator)
        q_order = torch.cat([g * group + torch.randperm(group, generator=generator) for g in kv_order.tolist()])

        def rows(weight, order):
            return weight.view(-1, head_dim, weight.shape[1])[order].reshape(weight.shape)

        state[prefix + "q_proj.weight"] = rows(state[prefix + "q_proj.weight"], q_order)
        state[prefix + "k_proj.weight"] = rows(state[prefix + "k_proj.weight"], kv_order)
        state[prefix + "v_proj.weight"] = rows(state[prefix + "v_proj.weight"], kv_order)
        o = state[prefix + "o_proj.weight"]
        state[prefix + "o_proj.weight"] = o.view(o.shape[0], heads, head_dim)[:, q_order].reshape(o.shape)


def disguise(model, cfg: Config, seed: int) -> None:
    """Apply every function-preserving transform above to `model` in place."""
    generator = torch.Generator().manual_seed(seed)
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    permute_residual(state, cfg.model.hidden_size, generator)
    permute_mlp_units(state, generator)
    permute_experts(state, generator)
    permute_heads(state, cfg, generator)
    model.load_state_dict(state)


# --- the calibration run ---------------------------------------------------------------------------


DERIVED_CASES: dict[str, str] = {
    "continued_training": "A trained further on the same data",
    "finetune_other_data": "A fine-tuned on code with lr 1e-2",
    "disguised": "A with permuted residual stream (+ sign flips), MLP units (+ rescaling), heads, experts",
    "disguised_then_finetuned": "disguised, then fine-tuned on English docs",
    "copied_embedding": "a model of another seed with A's embedding, then trained",
    "copied_layer": "a model of another seed with A's layer 2, then trained",
    "copied_router": "a model of another seed with A's layer-2 router, then trained",
    "extended_vocab": "A's embedding and head grown by 512 new tokens, then trained",
}


def derived_model(case: str, cfg_a: Config, model_a, seed: int, steps: int):
    """A model derived from `model_a` by `case` (see DERIVED_CASES), trained `steps` steps after the
    derivation (except `disguised`); returns (cfg, model)."""
    state_a = {n: t.detach().clone() for n, t in model_a.state_dict().items()}

    def copy_of_a(cfg: Config = cfg_a):
        model = build_model(cfg)
        model.load_state_dict(state_a)
        return model

    if case == "continued_training":
        model = copy_of_a()
        train_briefly(model, corpus_tokens("ko_libreoffice_help"), steps, 3e-3, seed)
        return cfg_a, model
    if case == "finetune_other_data":
        model = copy_of_a()
        train_briefly(model, corpus_tokens("code_python_stdlib"), steps, 1e-2, seed)
        return cfg_a, model
    if case in ("disguised", "disguised_then_finetuned"):
        model = copy_of_a()
        disguise(model, cfg_a, seed)
        if case == "disguised_then_finetuned":
            train_briefly(model, corpus_tokens("en_python_docs"), steps, 3e-3, seed)
        return cfg_a, model
    if case in ("copied_embedding", "copied_layer", "copied_router"):
        cfg_b = cfg_a.model_copy(update={"seed": seed})
        model = build_model(cfg_b)
        own = model.state_dict()
        wanted = {
            "copied_embedding": lambda n: n == "embed_tokens.weight",
            "copied_layer": lambda n: n.startswith("layers.2."),
            "copied_router": lambda n: n == "layers.2.mlp.gate.weight",
        }[case]
        own.update({n: t for n, t in state_a.items() if wanted(n)})
        model.load_state_dict(own)
        train_briefly(model, corpus_tokens("ko_libreoffice_help"), steps, 3e-3, seed)
        return cfg_b, model
    if case == "extended_vocab":
        cfg_b = cfg_a.model_copy(deep=True)
        cfg_b.model.vocab_size += 512
        model = build_model(cfg_b)
        state = model.state_dict()
        for name, tensor in state_a.items():
            if name in ("embed_tokens.weight", "lm_head.weight"):
                state[name] = torch.cat((tensor, state[name][tensor.shape[0]:]))
            else:
                state[name] = tensor
        model.load_state_dict(state)
        train_briefly(model, corpus_tokens("ko_libreoffice_help"), steps, 3e-3, seed)
        return cfg_b, model
    raise ValueError(f"unknown derived case {case!r}; known: {sorted(DERIVED_CASES)}")


def independent_views(count: int, steps: int, first_seed: int = 1000, log: Callable[[str], None] = print) -> list[ModelView]:
    """`count` models, each from its own seed and trained on its own data order."""
    views = []
    for seed in range(first_seed, first_seed + count):
        cfg, model = trained_model(seed, steps)
        views.append(view_of(model, cfg, f"seed {seed}"))
        log(f"trained the model of seed {seed}")
    return views


def null_pairs(views: list[ModelView], limit: int | None, seed: int = 0) -> list[tuple[int, int]]:
    """Pairs of distinct independent models (all of them, or `limit` drawn at random)."""
    pairs = list(itertools.combinations(range(len(views)), 2))
    random.Random(seed).shuffle(pairs)
    return sorted(pairs[:limit] if limit is not None else pairs)


def run(models: int, pair_limit: int | None, derived_repeats: int, steps: int, alpha: float,
        log: Callable[[str], None] = print) -> dict:
    started = time.time()
    views = independent_views(models, steps, log=log)
    null = []
    for i, j in null_pairs(views, pair_limit):
        report = compare_views(views[i], views[j], alpha=alpha)
        null.append({"a": views[i].source, "b": views[j].source, "log10_p": report["log10_p"],
                     "derived": report["derived"], "module_log10_p": [round(m["log10_p"], 3) for m in report["modules"]],
                     "kinds": [m["kind"] for m in report["modules"]]})
        log(f"null pair {views[i].source} / {views[j].source}: overall log10 p = {report['log10_p']:.2f}")
    derived = []
    for repeat in range(derived_repeats):
        cfg_a, model_a = trained_model(900 + repeat, steps)
        view_a = view_of(model_a, cfg_a, "A")
        for case in DERIVED_CASES:
            cfg_b, model_b = derived_model(case, cfg_a, model_a, seed=500 + repeat, steps=steps)
            report = compare_views(view_a, view_of(model_b, cfg_b, "B"), alpha=alpha)
            derived.append({"case": case, "repeat": repeat, "derived": report["derived"], "log10_p": report["log10_p"],
                            "shared_modules": report["shared_modules"]})
            log(f"{case} #{repeat}: derived={report['derived']} log10 p = {report['log10_p']:.1f} "
                f"shared={report['shared_modules'][:4]}")
    return summarize(null, derived, alpha, steps, models, time.time() - started)


# Modules a copy-one-module case must locate.
COPIED_MODULES = {
    "copied_embedding": {"embed"},
    "copied_layer": {"layers.2.attention", "layers.2.mlp.experts", "layers.2.mlp.router", "layers.2.mlp.shared_experts"},
    "copied_router": {"layers.2.mlp.router"},
}
REPORTED_LEVELS = (1e-2, 1e-3, 1e-4, 1e-6)


def summarize(null: list[dict], derived: list[dict], alpha: float, steps: int, models: int, seconds: float) -> dict:
    """False positives at several levels, calibration of every kind of module test, and detection and
    location of every derived case (levels applied to the recorded log10 p-values)."""
    overall = [n["log10_p"] for n in null]
    by_kind: dict[str, list[float]] = {}
    for n in null:
        for kind, log10_p in zip(n["kinds"], n["module_log10_p"]):
            by_kind.setdefault(kind, []).append(log10_p)

    def fraction_below(values, level):
        return sum(v < math.log10(level) for v in values) / len(values) if values else None

    def located(d):
        return COPIED_MODULES[d["case"]] <= set(d["shared_modules"]) if d["case"] in COPIED_MODULES else None

    return {
        "alpha": alpha,
        "train_steps": steps,
        "independent_models": models,
        "seconds": round(seconds, 1),
        "null_pairs": len(null),
        "false_positives": {f"{level:g}": sum(v < math.log10(level) for v in overall) for level in REPORTED_LEVELS},
        "false_positive_rate": fraction_below(overall, alpha),
        "null_overall_p_below": {f"{level:g}": fraction_below(overall, level) for level in (0.001, 0.01, 0.05, 0.1, 0.5)},
        "null_module_p_below": {kind: {f"{level:g}": fraction_below(values, level) for level in (0.01, 0.05, 0.1)}
                                | {"tests": len(values)} for kind, values in sorted(by_kind.items())},
        "null_min_log10_p": min(overall) if overall else None,
        "derived_detected": {case: f"{sum(d['log10_p'] < math.log10(alpha) for d in derived if d['case'] == case)}/"
                             f"{sum(d['case'] == case for d in derived)}" for case in DERIVED_CASES},
        "derived_located": {case: f"{sum(located(d) for d in derived if d['case'] == case)}/"
                            f"{sum(d['case'] == case for d in derived)}" for case in COPIED_MODULES},
        "derived_max_log10_p": {case: max((d["log10_p"] for d in derived if d["case"] == case), default=None)
                                for case in DERIVED_CASES},
        "null": null,
        "derived": derived,
    }


def write_results(summary: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    lines = [
        "# Provenance derivation test: calibration on tiny models (CPU)",
        "",
        (f"Generated by `python -P -m kmodel.provenance.calibrate` in {summary['seconds']} s. Every model is trained for real "
         f"({summary['train_steps']} AdamW steps on the bundled corpus, batch {BATCH} x {SEQ_LEN} tokens; derived models "
         f"train {summary['train_steps']} more steps after the derivation), then compared. Verdict threshold: "
         f"alpha = {summary['alpha']:g} (the default of `kmodel provenance compare`)."),
        "",
        "## Independent pairs (null hypothesis true)",
        "",
        (f"- pairs: {summary['null_pairs']} among {summary['independent_models']} models, each from its own init seed "
         "and data order (pairs share a model, so they are not independent draws, but every pair is a true null pair)"),
        (f"- flagged at alpha = {summary['alpha']:g}: {round(summary['false_positive_rate'] * summary['null_pairs'])} "
         f"(false-positive rate {summary['false_positive_rate']:.4f})"),
        "- flagged at other levels: " + ", ".join(f"{k}: {v}" for k, v in summary["false_positives"].items()),
        f"- smallest overall p-value seen: 10^{summary['null_min_log10_p']:.2f}",
        "- fraction of overall p-values below a level (a calibrated test gives about the level): "
        + ", ".join(f"{k}: {v:.4f}" for k, v in summary["null_overall_p_below"].items()),
        "",
        "| module test | tests | p < 0.01 | p < 0.05 | p < 0.1 |",
        "|---|---|---|---|---|",
    ]
    for kind, row in summary["null_module_p_below"].items():
        lines.append(f"| {kind} | {row['tests']} | {row['0.01']:.4f} | {row['0.05']:.4f} | {row['0.1']:.4f} |")
    lines += [
        "",
        "## Derived pairs (must be flagged)",
        "",
        "| case | what B is | detected | copied module located | weakest evidence (log10 p) |",
        "|---|---|---|---|---|",
    ]
    for case, what in DERIVED_CASES.items():
        weakest = summary["derived_max_log10_p"][case]
        lines.append(f"| {case} | {what} | {summary['derived_detected'][case]} | "
                     f"{summary['derived_located'].get(case, '')} | {'n/a' if weakest is None else f'{weakest:.1f}'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Calibrate `kmodel provenance compare` on tiny trained models.")
    parser.add_argument("--models", type=int, default=30, help="independently initialised and trained models")
    parser.add_argument("--null-pairs", type=int, default=None,
                        help="pairs of them to compare (default: every pair)")
    parser.add_argument("--derived-repeats", type=int, default=3, help="repetitions of every derived case")
    parser.add_argument("--steps", type=int, default=40, help="training steps of every model")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level of the verdict")
    parser.add_argument("--out", default="bench/results/provenance_calibration", help="output path without suffix")
    args = parser.parse_args(argv)
    summary = run(args.models, args.null_pairs, args.derived_repeats, args.steps, args.alpha,
                  log=lambda line: print(line, flush=True))
    write_results(summary, Path(args.out))
    print(f"false positives {summary['false_positives']}/{summary['null_pairs']}; derived detected {summary['derived_detected']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
