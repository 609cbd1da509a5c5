"""`kmodel provenance compare A B`: do two models share weights or an initialisation, and where?

Null hypothesis: A and B were initialised independently (and then trained however). Every test below
gives a p-value under that hypothesis and is blind to what a copier can do without changing the model's
function or by training on: permuting MLP units, heads and experts, flipping unit signs, rescaling units
or residual dimensions, continuing to train or fine-tune.

Per module (see stats.py for the statistics and docs/provenance.md for the reasoning):

  embedding / lm_head   rows paired by token string; the residual dimensions of B are matched to A's on one
                        half of the shared tokens, and the row similarity of the matched embeddings is
                        tested on the other half.
  mlp, shared_experts   units matched on the gate projection, the matching scored on up and down.
  attention             Gram tests on q, k, v, o (blind to head order and rotations within a head), plus
                        heads matched on q and scored on the per-head value-output product O_h V_h.
  experts               experts matched on their gate projections (unit-order blind), scored on their up
                        projections; inside each matched pair, units matched on gate and scored on down.
  router                Gram test on the router rows, plus the expert matching scored on router rows.

The residual stream itself may have been permuted (with sign flips) as a whole; every module is tested
under the identity pairing of residual dimensions and under the pairing recovered from the embeddings,
and its p-value is corrected for trying both. The overall p-value is the smaller of the Bonferroni-
corrected minimum over modules (finds one copied module) and Fisher's combination over all modules
(finds weak evidence spread over the whole model), itself corrected for taking the smaller of two.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kmodel.provenance import stats
from kmodel.provenance.views import AttentionWeights, ExpertWeights, LayerWeights, MlpWeights, ModelView, load_view
from kmodel.provenance.vocab import Vocab, compare_vocabs, load_vocab, shared_token_ids

DEFAULT_ALPHA = 1e-3
# Units beyond this are subsampled (evenly) on A's side before matching, to bound the similarity matrix.
DEFAULT_MAX_UNITS = 4096
# Held-out tokens scored in the embedding test.
EMBEDDING_TEST_TOKENS = 2048


@dataclass
class Alignment:
    """Pairing of residual dimensions: A's `a_dims[i]` with B's `b_dims[i]`, B's multiplied by `signs[i]`."""

    name: str
    a_dims: torch.Tensor
    b_dims: torch.Tensor
    signs: torch.Tensor

    def a(self, weight: torch.Tensor, axis: int) -> torch.Tensor:
        return weight.index_select(axis, self.a_dims)

    def b(self, weight: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * weight.dim()
        shape[axis] = -1
        return weight.index_select(axis, self.b_dims) * self.signs.view(shape)

    def same_as(self, other: "Alignment") -> bool:
        return (
            torch.equal(self.a_dims, other.a_dims)
            and torch.equal(self.b_dims, other.b_dims)
            and torch.equal(self.signs, other.signs)
        )


@dataclass
class ModuleResult:
    module: str  # e.g. "layers.3.mlp"
    kind: str  # embedding, attention, mlp, experts, router, shared_experts
    log_p: float  # natural log, corrected for the alignments tried
    alignment: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "p_value": math.exp(self.log_p),
            "log10_p": stats.log10(self.log_p),
            "alignment": self.alignment,
            **self.details,
        }


def identity_alignment(hidden_a: int, hidden_b: int) -> Alignment:
    k = min(hidden_a, hidden_b)
    dims = torch.arange(k)
    return Alignment("identity", dims, dims, torch.ones(k))


def _column_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    x = x / x.norm(dim=0).clamp_min(1e-30)
    y = y / y.norm(dim=0).clamp_min(1e-30)
    return x.t() @ y


def embedding_alignment(rows_a: torch.Tensor, rows_b: torch.Tensor, name: str = "embedding") -> Alignment:
    """Residual dimensions of B paired with A's (a signed permutation, partial when the widths differ)
    by how their columns correlate over the same tokens."""
    corr = _column_correlation(rows_a, rows_b)
    if corr.shape[0] <= corr.shape[1]:
        a_dims = torch.arange(corr.shape[0])
        b_dims = torch.from_numpy(stats.match_units(corr.abs()))
    else:
        b_dims = torch.arange(corr.shape[1])
        a_dims = torch.from_numpy(stats.match_units(corr.abs().t()))
    signs = torch.sign(corr[a_dims, b_dims])
    signs[signs == 0] = 1
    return Alignment(name, a_dims, b_dims, signs)


# --- module tests (B already in A's residual basis) ---------------------------------------------------


def _evenly(n: int, limit: int) -> torch.Tensor:
    return torch.arange(n) if n <= limit else torch.linspace(0, n - 1, limit).round().long()


def unit_matching_test(match_a, match_b, score_pairs, max_units: int) -> tuple[float, dict[str, Any]]:
    """Match the units (rows) of `match_a` to those of `match_b`, then score the matching on each
    (rows_a, rows_b) of `score_pairs`. Returns Fisher's combination (ln p) and what was seen."""
    transpose = match_a.shape[0] > match_b.shape[0]
    if transpose:  # match the smaller side into the larger one
        match_a, match_b = match_b, match_a
        score_pairs = [(b, a) for a, b in score_pairs]
    keep = _evenly(match_a.shape[0], max_units)
    similarity = stats.abs_cosine(match_a[keep], match_b)
    pairs = stats.match_units(similarity)
    log_ps, z_scores, matched, baseline, consistent = [], [], [], [], []
    for rows_a, rows_b in score_pairs:
        scores = stats.abs_cosine(rows_a[keep], rows_b)
        z, log_p = stats.pairing_log_p(scores, pairs)
        log_ps.append(log_p)
        z_scores.append(round(z, 2))
        matched.append(round(float(scores[torch.arange(len(keep)), torch.as_tensor(pairs)].mean()), 4))
        baseline.append(round(float(scores.mean()), 4))
        consistent.append(round(float((scores.argmax(dim=1).numpy() == pairs).mean()), 4))
    details = {
        "units": [int(match_a.shape[0]), int(match_b.shape[0])],
        "units_tested": len(keep),
        "z": z_scores,
        "matched_similarity": matched,
        "unmatched_similarity": baseline,
        "consistent_units": consistent,
    }
    return stats.fisher_log_p(log_ps), details


def mlp_test(a: MlpWeights, b: MlpWeights, align: Alignment, max_units: int) -> tuple[float, dict[str, Any]]:
    return unit_matching_test(
        align.a(a.gate, 1),
        align.b(b.gate, 1),
        [(align.a(a.up, 1), align.b(b.up, 1)), (align.a(a.down, 0).t(), align.b(b.down, 0).t())],
        max_units,
    )


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """(blocks, rows, hidden) -> (blocks * rows, hidden)."""
    return weight.reshape(-1, weight.shape[-1])


def attention_test(a: AttentionWeights, b: AttentionWeights, align: Alignment, draws: int) -> tuple[float, dict[str, Any]]:
    qa, ka, va = (align.a(t, 2) for t in (a.q, a.k, a.v))
    qb, kb, vb = (align.b(t, 2) for t in (b.q, b.k, b.v))
    oa, ob = align.a(a.o, 1), align.b(b.o, 1)  # (heads, hidden, head_dim)
    log_ps, details = [], {}
    for label, x, y in (("q", qa, qb), ("k", ka, kb), ("v", va, vb), ("o", oa.transpose(1, 2), ob.transpose(1, 2))):
        r, z, log_p = stats.gram_test(_rows(x), _rows(y), draws=draws)
        log_ps.append(log_p)
        details[f"gram_{label}"] = {"r": round(r, 4), "z": round(z, 2), "log10_p": round(stats.log10(log_p), 2)}
    if qa.shape[1] == qb.shape[1] and qa.shape[0] <= qb.shape[0]:
        pairs = stats.match_units(stats.offdiagonal_gram_similarity(qa, qb))
        scores = _value_output_similarity(oa, va, ob, vb)
        z, log_p = stats.pairing_log_p(scores, pairs)
        log_ps.append(log_p)
        details["heads"] = {"pairs": pairs.tolist(), "z": round(z, 2), "log10_p": round(stats.log10(log_p), 2)}
    return stats.fisher_log_p(log_ps), details


def _value_output_similarity(oa, va, ob, vb) -> torch.Tensor:
    """cos between head a's O_a V_a and head b's O_b V_b (hidden x hidden each), via head_dim x head_dim
    products; blind to any rotation of a head's value space, which O V does not see."""
    va = va.repeat_interleave(oa.shape[0] // va.shape[0], dim=0)  # each query head's kv head (GQA)
    vb = vb.repeat_interleave(ob.shape[0] // vb.shape[0], dim=0)
    inner = torch.einsum("ahd,bhe->abde", oa, ob) * torch.einsum("adh,beh->abde", va, vb)
    cross = inner.sum(dim=(2, 3))
    norm_a = (torch.einsum("ahd,ahe->ade", oa, oa) * torch.einsum("adh,aeh->ade", va, va)).sum(dim=(1, 2))
    norm_b = (torch.einsum("ahd,ahe->ade", ob, ob) * torch.einsum("adh,aeh->ade", vb, vb)).sum(dim=(1, 2))
    return cross / (norm_a.clamp_min(1e-30).sqrt()[:, None] * norm_b.clamp_min(1e-30).sqrt()[None, :])


def experts_test(a: ExpertWeights, b: ExpertWeights, align: Alignment, max_units: int) -> tuple[float, dict[str, Any], np.ndarray | None]:
    gate_a, up_a, down_a = align.a(a.gate, 2), align.a(a.up, 2), align.a(a.down, 1).transpose(1, 2)
    gate_b, up_b, down_b = align.b(b.gate, 2), align.b(b.up, 2), align.b(b.down, 1).transpose(1, 2)
    if gate_a.shape[0] > gate_b.shape[0]:
        return 0.0, {"skipped": f"A has more experts ({gate_a.shape[0]}) than B ({gate_b.shape[0]})"}, None
    expert_pairs = stats.match_units(stats.offdiagonal_gram_similarity(gate_a, gate_b))
    z, expert_log_p = stats.pairing_log_p(stats.offdiagonal_gram_similarity(up_a, up_b), expert_pairs)
    per_expert = []
    for e, f in enumerate(expert_pairs):
        log_p, _ = unit_matching_test(gate_a[e], gate_b[f], [(down_a[e], down_b[f])], max_units)
        per_expert.append(log_p)
    details = {
        "expert_pairs": expert_pairs.tolist(),
        "expert_matching": {"z": round(z, 2), "log10_p": round(stats.log10(expert_log_p), 2)},
        "per_expert_log10_p": [round(stats.log10(p), 2) for p in per_expert],
    }
    return stats.fisher_log_p([expert_log_p, *per_expert]), details, expert_pairs


def router_test(a: torch.Tensor, b: torch.Tensor, align: Alignment, expert_pairs: np.ndarray | None, draws: int) -> tuple[float, dict[str, Any]]:
    ra, rb = align.a(a, 1), align.b(b, 1)
    r, z, gram_log_p = stats.gram_test(ra, rb, draws=draws)
    log_ps = [gram_log_p]
    details: dict[str, Any] = {"gram": {"r": round(r, 4), "z": round(z, 2), "log10_p": round(stats.log10(gram_log_p), 2)}}
    if expert_pairs is not None:
        z, log_p = stats.pairing_log_p(stats.abs_cosine(ra, rb), expert_pairs)
        log_ps.append(log_p)
        details["rows_under_expert_matching"] = {"z": round(z, 2), "log10_p": round(stats.log10(log_p), 2)}
    return stats.fisher_log_p(log_ps), details


def embedding_test(rows_a: torch.Tensor, rows_b: torch.Tensor, label: str) -> tuple[float, dict[str, Any]]:
    """Tokens alternate between a half that pairs the residual dimensions and a half that tests the
    pairing: same-token rows must be more similar than rows of different tokens."""
    fit_a, fit_b = rows_a[0::2], rows_b[0::2]
    test = _evenly(rows_a[1::2].shape[0], EMBEDDING_TEST_TOKENS)
    test_a, test_b = rows_a[1::2][test], rows_b[1::2][test]
    align = embedding_alignment(fit_a, fit_b, label)
    centred_a = align.a(test_a - fit_a.mean(dim=0), 1)
    centred_b = align.b(test_b - fit_b.mean(dim=0), 1)
    scores = stats.unit_rows(centred_a) @ stats.unit_rows(centred_b).t()
    identity = np.arange(scores.shape[0])
    z, log_p = stats.pairing_log_p(scores, identity)
    details = {
        "shared_tokens": int(rows_a.shape[0]),
        "tokens_tested": int(scores.shape[0]),
        "z": round(z, 2),
        "same_token_cosine": round(float(scores.diagonal().mean()), 4),
        "other_token_cosine": round(float(scores.mean()), 4),
    }
    return log_p, details


# --- the whole comparison ---------------------------------------------------------------------------


def _token_rows(view_a: ModelView, view_b: ModelView, vocab_a: Vocab | None, vocab_b: Vocab | None, notes: list[str]):
    """Ids of the same tokens in A and B (by token string when both tokenizers are known)."""
    if vocab_a is not None and vocab_b is not None:
        return shared_token_ids(vocab_a, vocab_b)
    size_a = view_a.embed.shape[0] if view_a.embed is not None else view_a.lm_head.shape[0]
    size_b = view_b.embed.shape[0] if view_b.embed is not None else view_b.lm_head.shape[0]
    n = min(size_a, size_b)
    notes.append(f"tokenizers not available for both models: rows 0..{n - 1} assumed to be the same tokens in A and B")
    return torch.arange(n), torch.arange(n)


def _layer_pairs(view_a: ModelView, view_b: ModelView, all_pairs: bool | None) -> list[tuple[str, str]]:
    names_a, names_b = list(view_a.layers), list(view_b.layers)
    if all_pairs is None:
        all_pairs = len(names_a) != len(names_b)
    if all_pairs:
        return [(x, y) for x in names_a for y in names_b]
    return [(x, x) for x in names_a if x in view_b.layers]


def _module_tests(layer_a: LayerWeights, layer_b: LayerWeights, align: Alignment, max_units: int, draws: int):
    """(kind, ln p, details) for each module both layers have."""
    results = []
    if layer_a.attention is not None and layer_b.attention is not None:
        results.append(("attention", *attention_test(layer_a.attention, layer_b.attention, align, draws)))
    if layer_a.mlp is not None and layer_b.mlp is not None:
        results.append(("mlp", *mlp_test(layer_a.mlp, layer_b.mlp, align, max_units)))
    if layer_a.shared is not None and layer_b.shared is not None:
        results.append(("shared_experts", *mlp_test(layer_a.shared, layer_b.shared, align, max_units)))
    expert_pairs = None
    if layer_a.experts is not None and layer_b.experts is not None:
        log_p, details, expert_pairs = experts_test(layer_a.experts, layer_b.experts, align, max_units)
        results.append(("experts", log_p, details))
    if layer_a.router is not None and layer_b.router is not None:
        results.append(("router", *router_test(layer_a.router, layer_b.router, align, expert_pairs, draws)))
    return results


def compare_views(
    view_a: ModelView,
    view_b: ModelView,
    vocab_a: Vocab | None = None,
    vocab_b: Vocab | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    max_units: int = DEFAULT_MAX_UNITS,
    draws: int = 200,
    all_layer_pairs: bool | None = None,
) -> dict[str, Any]:
    """The derivation report for two loaded models (see the module docstring)."""
    notes: list[str] = []
    modules: list[ModuleResult] = []
    alignments = [identity_alignment(view_a.hidden_size, view_b.hidden_size)]
    if view_a.hidden_size != view_b.hidden_size:
        notes.append(f"hidden sizes differ ({view_a.hidden_size} vs {view_b.hidden_size}): residual dimensions are paired partially")

    have_rows = (view_a.embed is not None or view_a.lm_head is not None) and (view_b.embed is not None or view_b.lm_head is not None)
    if have_rows:
        ids_a, ids_b = _token_rows(view_a, view_b, vocab_a, vocab_b, notes)
        for label in ("embed", "lm_head"):
            rows_a, rows_b = getattr(view_a, label), getattr(view_b, label)
            if rows_a is None or rows_b is None:
                continue
            if len(ids_a) < 64:
                notes.append(f"{label}: only {len(ids_a)} shared tokens; not tested")
                continue
            rows_a, rows_b = rows_a[ids_a], rows_b[ids_b]
            log_p, details = embedding_test(rows_a, rows_b, label)
            modules.append(ModuleResult(label, "embedding", log_p, "split-half", details))
            if len(alignments) == 1:
                found = embedding_alignment(rows_a, rows_b, label)
                if not found.same_as(alignments[0]):
                    alignments.append(found)

    for name_a, name_b in _layer_pairs(view_a, view_b, all_layer_pairs):
        per_kind: dict[str, list[tuple[float, str, dict]]] = {}
        for align in alignments:
            for kind, log_p, details in _module_tests(view_a.layers[name_a], view_b.layers[name_b], align, max_units, draws):
                per_kind.setdefault(kind, []).append((log_p, align.name, details))
        label = name_a if name_a == name_b else f"{name_a}~{name_b}"
        for kind, tried in per_kind.items():
            log_p, align_name, details = min(tried, key=lambda t: t[0])
            corrected = stats.bonferroni_log_p(log_p, len(tried))
            module = f"{label}.mlp.{kind}" if kind in ("experts", "router", "shared_experts") else f"{label}.{kind}"
            modules.append(ModuleResult(module, kind, corrected, align_name, details))

    if not modules:
        raise ValueError(f"{view_a.source} and {view_b.source} have no module in common to compare")
    tests = len(modules)
    min_module = min(modules, key=lambda m: m.log_p)
    log_p_min = stats.bonferroni_log_p(min_module.log_p, tests)
    log_p_fisher = stats.fisher_log_p([m.log_p for m in modules])
    log_p_overall = stats.bonferroni_log_p(min(log_p_min, log_p_fisher), 2)
    flagged = [m.module for m in modules if stats.bonferroni_log_p(m.log_p, tests) < math.log(alpha)]
    return {
        "a": view_a.source,
        "b": view_b.source,
        "alpha": alpha,
        "derived": log_p_overall < math.log(alpha),
        "p_value": math.exp(log_p_overall),
        "log10_p": stats.log10(log_p_overall),
        "log10_p_min_module": stats.log10(log_p_min),
        "log10_p_fisher": stats.log10(log_p_fisher),
        "modules_tested": tests,
        "shared_modules": flagged,
        "alignments": [a.name for a in alignments],
        "modules": [m.as_dict() for m in modules],
        "unmapped_a": view_a.unmapped,
        "unmapped_b": view_b.unmapped,
        "notes": notes,
    }


def _vocab_or_none(path: Path | None, notes: list[str], label: str) -> Vocab | None:
    if path is None:
        notes.append(f"no tokenizer found for {label}")
        return None
    return load_vocab(path)


def compare(
    path_a: str | Path,
    path_b: str | Path,
    *,
    tokenizer_a: str | Path | None = None,
    tokenizer_b: str | Path | None = None,
    alpha: float = DEFAULT_ALPHA,
    max_units: int = DEFAULT_MAX_UNITS,
    draws: int = 200,
    all_layer_pairs: bool | None = None,
) -> dict[str, Any]:
    """Compare two kmodel checkpoints or Hugging Face safetensors directories, weights and tokenizers."""
    view_a, view_b = load_view(path_a), load_view(path_b)
    notes: list[str] = []
    vocab_a = _vocab_or_none(Path(tokenizer_a) if tokenizer_a else view_a.tokenizer_path, notes, "A")
    vocab_b = _vocab_or_none(Path(tokenizer_b) if tokenizer_b else view_b.tokenizer_path, notes, "B")
    report = compare_views(view_a, view_b, vocab_a, vocab_b, alpha=alpha, max_units=max_units, draws=draws,
                           all_layer_pairs=all_layer_pairs)
    report["tokenizers"] = compare_vocabs(vocab_a, vocab_b) if vocab_a and vocab_b else None
    report["notes"] = notes + report["notes"]
    return report


def format_report(report: dict[str, Any]) -> str:
    """Plain-text rendering of a comparison report."""
    verdict = "DERIVED (shares weights or initialisation)" if report["derived"] else "no evidence of derivation"
    lines = [
        f"A: {report['a']}",
        f"B: {report['b']}",
        f"verdict: {verdict}  (overall p = {_p_text(report['log10_p'])}, alpha = {report['alpha']:g})",
        f"  min over {report['modules_tested']} modules (Bonferroni): p = {_p_text(report['log10_p_min_module'])}",
        f"  Fisher over all modules:           p = {_p_text(report['log10_p_fisher'])}",
        f"residual alignments tried: {', '.join(report['alignments'])}",
        "",
        f"{'module':<32} {'kind':<15} {'p-value':>12}  alignment",
    ]
    for m in report["modules"]:
        mark = "  <- shared" if m["module"] in report["shared_modules"] else ""
        lines.append(f"{m['module']:<32} {m['kind']:<15} {_p_text(m['log10_p']):>12}  {m['alignment']}{mark}")
    tok = report.get("tokenizers")
    if tok:
        lines += [
            "",
            f"tokenizers: {tok['relation']}; shared tokens {tok['shared_tokens']} (Jaccard {tok['jaccard']:.3f}), "
            f"same id for {tok['same_id_fraction']:.1%} of shared, common id prefix {tok['common_id_prefix']}"
            + (f", common merge prefix {tok['common_merge_prefix']}" if "common_merge_prefix" in tok else ""),
        ]
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if report["unmapped_a"] or report["unmapped_b"]:
        lines.append(f"not compared: {len(report['unmapped_a'])} tensors of A, {len(report['unmapped_b'])} of B "
                     f"(e.g. {(report['unmapped_a'] + report['unmapped_b'])[:3]})")
    return "\n".join(lines)


def _p_text(log10_p: float) -> str:
    return f"{10 ** log10_p:.3g}" if log10_p > -300 else f"1e{log10_p:.0f}"


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1), encoding="utf-8")
