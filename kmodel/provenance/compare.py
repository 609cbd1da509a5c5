"""`kmodel provenance compare A B`: do two models share weights or an initialisation, and where?

Null hypothesis: A and B were initialised independently (and then trained however). Every test below
gives a p-value under that hypothesis and is blind to what a copier can do without changing the model's
function or by training on: permuting MLP units, heads and experts, flipping unit signs, rescaling units
or residual dimensions, continuing to train or fine-tune.

Every module except the embeddings is tested the same way (`column_test`): its units (MLP units, rows
of q/k/v/o, experts and their units, router rows) are matched between A and B on the even residual
dimensions, and on the odd dimensions the matched weights must agree dimension by dimension more than
mismatched dimensions do. Training treats residual dimensions alike, so for independently initialised
models the matching half says nothing about the testing half: the p-value is that of a permutation test,
valid however both models were trained (docs/provenance.md has the argument and the calibration).

  embedding / lm_head   rows paired by token string; residual dimension i of A against dimension i of B
                        (identity pairing only, see `embedding_test`).

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
from kmodel.provenance.views import (
    AttentionWeights,
    ExpertWeights,
    LayerWeights,
    MlpWeights,
    ModelView,
    load_view,
)
from kmodel.provenance.vocab import Vocab, compare_vocabs, load_vocab, shared_token_ids

# Verdict threshold. Deliberately strict: a false accusation is costly, and derived pairs score far below
# it (bench/results/provenance_calibration.md).
DEFAULT_ALPHA = 1e-6
# Units beyond this are subsampled (evenly) on A's side before matching, to bound the similarity matrix.
DEFAULT_MAX_UNITS = 4096


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

    def same_as(self, other: Alignment) -> bool:
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


def without_shared_token_factors(rows_a: torch.Tensor, rows_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both embeddings with the leading token factors of either removed (columns centred first), as
    input to `embedding_alignment`.

    Models trained on the same tokens learn the same token-level structure, token frequency above all,
    which in each model lies mostly in a few token-space directions (the leading left singular vectors).
    Left in, it dominates the column correlations and a signed permutation partly lines it up between
    unrelated models; without it, the pairing of a derived model follows the shared initial noise, which
    the remaining directions still carry."""
    a = rows_a - rows_a.mean(dim=0)
    b = rows_b - rows_b.mean(dim=0)
    k = min(a.shape[1], b.shape[1], a.shape[0] // 8) // 2
    if k == 0:
        return a, b
    basis = torch.linalg.qr(torch.cat((_leading_left_vectors(a, k), _leading_left_vectors(b, k)), dim=1))[0]
    return a - basis @ (basis.t() @ a), b - basis @ (basis.t() @ b)


def _leading_left_vectors(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading left singular vectors of a tall matrix, through its small hidden x hidden Gram matrix."""
    values, vectors = torch.linalg.eigh((x.t() @ x).double())
    top = vectors[:, -k:]
    return (x.double() @ top / values[-k:].clamp_min(1e-30).sqrt()).to(x.dtype)


def embedding_alignment(rows_a: torch.Tensor, rows_b: torch.Tensor, name: str = "embedding") -> Alignment:
    """Residual dimensions of B paired with A's (a signed permutation, partial when the widths differ)
    by how their columns correlate over the same tokens (rows as `without_shared_token_factors` leaves them)."""
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


# --- module tests ----------------------------------------------------------------------------------


def _evenly(n: int, limit: int) -> torch.Tensor:
    return torch.arange(n) if n <= limit else torch.linspace(0, n - 1, limit).round().long()


@dataclass
class RowGroup:
    """Matrices of one module whose rows are the same units, each (units, hidden), residual dimensions on
    the last axis: an MLP's gate, up and down^T share their units; attention's q, k, v and o^T are four
    groups of one matrix each (rows may be permuted freely, heads included)."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]


def split_dimensions(align: Alignment) -> tuple[Alignment, Alignment]:
    """The residual dimension pairs at even and at odd positions: one half matches units, the other tests."""
    even = Alignment(align.name, align.a_dims[0::2], align.b_dims[0::2], align.signs[0::2])
    odd = Alignment(align.name, align.a_dims[1::2], align.b_dims[1::2], align.signs[1::2])
    return even, odd


def _features(parts: list[torch.Tensor], dims: Alignment, side: str) -> torch.Tensor:
    pick = dims.a if side == "a" else dims.b
    return torch.cat([stats.standardize(pick(x, 1)) for x in parts], dim=1)


def match_rows(group: RowGroup, dims: Alignment, max_units: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Units of A paired with units of B by their weights on the residual dimensions `dims` (the smaller
    side matched into the larger, at most `max_units` of it, evenly spaced). Returns the paired row indices
    and the mean |cos| of paired rows and of all row pairs (how clear the matching was)."""
    fa, fb = _features(group.a, dims, "a"), _features(group.b, dims, "b")
    swap = fa.shape[0] > fb.shape[0]
    small, large = (fb, fa) if swap else (fa, fb)
    keep = _evenly(small.shape[0], max_units)
    similarity = stats.abs_cosine(small[keep], large)
    pairs = torch.from_numpy(stats.match_units(similarity))
    matched = float(similarity[torch.arange(len(keep)), pairs].mean())
    rows_a, rows_b = (pairs, keep) if swap else (keep, pairs)
    return rows_a, rows_b, matched, float(similarity.mean())


def column_test(groups: list[RowGroup], align: Alignment, max_units: int) -> tuple[float, dict[str, Any]]:
    """Split-dimension test of one module (ln p, details).

    Units are matched on the even residual dimensions; on the odd dimensions, each dimension of A becomes
    a column vector over the matched units (all matrices of the module stacked) and is compared with the
    same dimension of B. Under the null hypothesis B's residual dimensions are exchangeable: B was trained
    from an i.i.d. initialisation by a procedure that treats residual dimensions alike, so permuting them
    gives an equally likely model. The matching depends on the even dimensions only, so among the odd
    ones the true pairing scores like a random one; that is an exact permutation test whatever training
    did to either model, and its p-value comes from Hoeffding's combinatorial CLT (exact below 9
    dimensions). A unit's sign is taken from the matching half, so flipped units still line up."""
    match_dims, test_dims = split_dimensions(align)
    columns_a, columns_b, matched, unmatched = [], [], [], []
    for group in groups:
        rows_a, rows_b, paired, background = match_rows(group, match_dims, max_units)
        matched.append(paired)
        unmatched.append(background)
        for xa, xb in zip(group.a, group.b):
            signs = torch.sign((match_dims.a(xa, 1)[rows_a] * match_dims.b(xb, 1)[rows_b]).sum(dim=1))
            columns_a.append(stats.unit_rows(test_dims.a(xa, 1)[rows_a]))
            columns_b.append(stats.unit_rows(test_dims.b(xb, 1)[rows_b]) * signs[:, None])
    cols_a, cols_b = torch.cat(columns_a).t(), torch.cat(columns_b).t()  # (test dims, matched rows)
    cols_a = cols_a - cols_a.mean(dim=1, keepdim=True)
    cols_b = cols_b - cols_b.mean(dim=1, keepdim=True)
    scores = stats.unit_rows(cols_a) @ stats.unit_rows(cols_b).t()
    z, log_p = stats.pairing_log_p(scores, np.arange(scores.shape[0]))
    details = {
        "z": round(z, 2),
        "dimensions_tested": int(scores.shape[0]),
        "rows_matched": int(cols_a.shape[1]),
        "matched_row_similarity": round(sum(matched) / len(matched), 4),
        "random_row_similarity": round(sum(unmatched) / len(unmatched), 4),
        "same_dimension_correlation": round(float(scores.diagonal().mean()), 4),
    }
    return log_p, details


def mlp_groups(a: MlpWeights, b: MlpWeights) -> list[RowGroup]:
    return [RowGroup([a.gate, a.up, a.down.t()], [b.gate, b.up, b.down.t()])]


def attention_groups(a: AttentionWeights, b: AttentionWeights) -> list[RowGroup]:
    def rows(weight: torch.Tensor) -> torch.Tensor:  # (blocks, rows, hidden) -> (blocks * rows, hidden)
        return weight.reshape(-1, weight.shape[-1])

    return [
        RowGroup([rows(a.q)], [rows(b.q)]),
        RowGroup([rows(a.k)], [rows(b.k)]),
        RowGroup([rows(a.v)], [rows(b.v)]),
        RowGroup([rows(a.o.transpose(1, 2))], [rows(b.o.transpose(1, 2))]),
    ]


def expert_groups(a: ExpertWeights, b: ExpertWeights, align: Alignment) -> tuple[list[RowGroup], list[int]]:
    """One group per matched expert pair. Experts are matched on the matching half of the residual
    dimensions by a similarity that ignores the order of units inside an expert."""
    match_dims, _ = split_dimensions(align)

    def blocks(e: ExpertWeights, side: str) -> torch.Tensor:
        pick = match_dims.a if side == "a" else match_dims.b
        return torch.cat((pick(e.gate, 2), pick(e.up, 2), pick(e.down.transpose(1, 2), 2)), dim=1)

    similarity = stats.offdiagonal_gram_similarity(blocks(a, "a"), blocks(b, "b"))
    swap = similarity.shape[0] > similarity.shape[1]
    pairs = stats.match_units(similarity.t() if swap else similarity)
    pairing = [(int(p), i) for i, p in enumerate(pairs)] if swap else list(enumerate(int(p) for p in pairs))
    groups = [
        RowGroup([a.gate[e], a.up[e], a.down[e].t()], [b.gate[f], b.up[f], b.down[f].t()]) for e, f in pairing
    ]
    return groups, [f for _, f in sorted(pairing)]


def embedding_test(rows_a: torch.Tensor, rows_b: torch.Tensor) -> tuple[float, dict[str, Any]]:
    """Rows of the same tokens; residual dimension i of A (a column over tokens) against dimension i of B.

    Exact by the same symmetry as `column_test` (B's residual dimensions are exchangeable under the null
    hypothesis), with the rows already paired by token string, whatever token structure both models
    learned from the same data. Only the identity pairing of residual dimensions is tested: recovering a
    permutation from the embedding itself and testing it there would reward the token geometry every
    model trained on the same text shares (tried: p < 0.05 for 14 % of unrelated pairs)."""
    width = min(rows_a.shape[1], rows_b.shape[1])
    scores = _column_correlation(rows_a[:, :width], rows_b[:, :width])
    z, log_p = stats.pairing_log_p(scores, np.arange(width))
    details = {
        "shared_tokens": int(rows_a.shape[0]),
        "dimensions_tested": width,
        "z": round(z, 2),
        "same_dimension_correlation": round(float(scores.diagonal().mean()), 4),
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
    """Layers to compare: same index (and MTP with MTP) when both have as many decoder layers, every pair
    otherwise (a pruned or grown model's layers need not keep their depth)."""
    names_a, names_b = list(view_a.layers), list(view_b.layers)
    if all_pairs is None:
        all_pairs = sum(not n.startswith("mtp.") for n in names_a) != sum(not n.startswith("mtp.") for n in names_b)
    if all_pairs:
        return [(x, y) for x in names_a for y in names_b]
    return [(x, x) for x in names_a if x in view_b.layers]


def _module_tests(layer_a: LayerWeights, layer_b: LayerWeights, align: Alignment, max_units: int):
    """(kind, ln p, details) for each module both layers have."""
    results = []
    if layer_a.attention is not None and layer_b.attention is not None:
        results.append(("attention", *column_test(attention_groups(layer_a.attention, layer_b.attention), align, max_units)))
    if layer_a.mlp is not None and layer_b.mlp is not None:
        results.append(("mlp", *column_test(mlp_groups(layer_a.mlp, layer_b.mlp), align, max_units)))
    if layer_a.shared is not None and layer_b.shared is not None:
        results.append(("shared_experts", *column_test(mlp_groups(layer_a.shared, layer_b.shared), align, max_units)))
    if layer_a.experts is not None and layer_b.experts is not None:
        groups, pairing = expert_groups(layer_a.experts, layer_b.experts, align)
        log_p, details = column_test(groups, align, max_units)
        results.append(("experts", log_p, {**details, "expert_pairs": pairing}))
    if layer_a.router is not None and layer_b.router is not None:
        results.append(("router", *column_test([RowGroup([layer_a.router], [layer_b.router])], align, max_units)))
    return results


def compare_views(
    view_a: ModelView,
    view_b: ModelView,
    vocab_a: Vocab | None = None,
    vocab_b: Vocab | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    max_units: int = DEFAULT_MAX_UNITS,
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
            log_p, details = embedding_test(rows_a, rows_b)
            modules.append(ModuleResult(label, "embedding", log_p, "identity", details))
            if len(alignments) == 1:
                found = embedding_alignment(*without_shared_token_factors(rows_a, rows_b), label)
                if not found.same_as(alignments[0]):
                    alignments.append(found)

    for name_a, name_b in _layer_pairs(view_a, view_b, all_layer_pairs):
        per_kind: dict[str, list[tuple[float, str, dict]]] = {}
        for align in alignments:
            for kind, log_p, details in _module_tests(view_a.layers[name_a], view_b.layers[name_b], align, max_units):
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
    all_layer_pairs: bool | None = None,
) -> dict[str, Any]:
    """Compare two kmodel checkpoints or Hugging Face safetensors directories, weights and tokenizers."""
    view_a, view_b = load_view(path_a), load_view(path_b)
    notes: list[str] = []
    vocab_a = _vocab_or_none(Path(tokenizer_a) if tokenizer_a else view_a.tokenizer_path, notes, "A")
    vocab_b = _vocab_or_none(Path(tokenizer_b) if tokenizer_b else view_b.tokenizer_path, notes, "B")
    report = compare_views(view_a, view_b, vocab_a, vocab_b, alpha=alpha, max_units=max_units,
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
