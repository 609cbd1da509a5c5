"""Statistics for the derivation test: similarities blind to unit order and scale, matching, and
p-values for a pairing.

A pairing test asks whether a given pairing of rows to columns of a score matrix scores higher than a
random pairing would. When the pairing was chosen without looking at the scores (compare.py matches
units on one half of the residual dimensions and scores on the other), that is an exact permutation
test: the null distribution of the total score is that of a uniformly random pairing, whose mean and
variance Hoeffding's combinatorial central limit theorem gives in closed form; up to 8 units every
pairing is enumerated instead.

All p-values are carried as natural logarithms so that overwhelming evidence (p = 1e-300 and beyond)
neither underflows nor stops ranking.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

# Exact enumeration of all pairings is used up to this many units (8! = 40320 permutations).
EXACT_MAX_UNITS = 8


def _scipy():
    try:
        import scipy.optimize
        import scipy.special
    except ImportError:
        raise RuntimeError("kmodel provenance compare needs scipy (pip install scipy)") from None
    return scipy


# --- normalisation and similarity ----------------------------------------------------------------


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (an all-zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Columns (the residual dimensions) scaled to unit length, then rows to unit length. Makes row
    similarities blind to per-unit rescaling and to norm weights folded into the residual columns."""
    return unit_rows(x / x.norm(dim=0, keepdim=True).clamp_min(1e-30))


def abs_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cos| between every row of `a` and every row of `b`; absolute because flipping a unit's sign in
    the up and down projections together leaves a SwiGLU MLP unchanged."""
    return (standardize(a) @ standardize(b).t()).abs()


def offdiagonal_gram_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Similarity of every block of `a` (n, rows, hidden) to every block of `b` (m, rows, hidden) that is
    blind to how rows are ordered or rotated within a block: the cosine between the off-diagonal parts of
    the blocks' hidden x hidden Gram matrices. Computed through rows x rows products, never forming the
    Gram matrices. The diagonal is left out because it is nearly the same for any two random blocks."""
    a = unit_rows(a)
    b = unit_rows(b)
    cross = torch.einsum("nrh,msh->nmrs", a, b).pow(2).sum(dim=(2, 3))
    diag_a, diag_b = a.pow(2).sum(dim=1), b.pow(2).sum(dim=1)  # (n, hidden), (m, hidden)
    cross = cross - diag_a @ diag_b.t()
    self_a = torch.einsum("nrh,nsh->nrs", a, a).pow(2).sum(dim=(1, 2)) - diag_a.pow(2).sum(dim=1)
    self_b = torch.einsum("nrh,nsh->nrs", b, b).pow(2).sum(dim=(1, 2)) - diag_b.pow(2).sum(dim=1)
    return cross / (self_a.clamp_min(1e-30).sqrt()[:, None] * self_b.clamp_min(1e-30).sqrt()[None, :])


# --- matching -------------------------------------------------------------------------------------


def match_units(similarity: torch.Tensor) -> np.ndarray:
    """The pairing of rows to columns with the largest total similarity (Hungarian algorithm):
    `pairs[i]` is the column matched to row i. Rows must not outnumber columns."""
    scipy = _scipy()
    rows, cols = scipy.optimize.linear_sum_assignment(similarity.double().numpy(), maximize=True)
    pairs = np.empty(similarity.shape[0], dtype=np.int64)
    pairs[rows] = cols
    return pairs


# --- p-values (natural log) -----------------------------------------------------------------------


def log_normal_sf(z: float) -> float:
    return float(_scipy().special.log_ndtr(-z))


def standardize_scores(scores: torch.Tensor) -> torch.Tensor:
    """Rows z-scored, then columns. Training makes some dimensions (and units) large everywhere, which
    scales all their scores alike: a product of a row and a column effect, which centring alone does not
    remove. Standardising both ways does; it is a fixed transform of the scores, so a permutation null
    distribution computed from them stays exact."""
    c = scores.double()
    c = (c - c.mean(dim=1, keepdim=True)) / c.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-30)
    return (c - c.mean(dim=0, keepdim=True)) / c.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-30)


def pairing_log_p(scores: torch.Tensor, pairs: np.ndarray) -> tuple[float, float]:
    """(z, ln p) of the total score of `pairs` among the scores of all pairings.

    `scores` (n, n): score of row i paired with column j; `pairs[i]` is row i's column. Null hypothesis:
    the pairing is uniformly random, independent of the scores. Up to 8 rows the p-value is exact (all n!
    pairings); beyond, Hoeffding's combinatorial CLT gives the exact mean and variance and the normal
    tail is used."""
    n = scores.shape[0]
    if scores.shape != (n, n) or n < 2:
        raise ValueError(f"pairing_log_p needs a square score matrix of at least 2 rows, got {tuple(scores.shape)}")
    c = standardize_scores(scores)
    observed = float(c[torch.arange(n), torch.as_tensor(pairs)].sum())
    if n <= EXACT_MAX_UNITS:
        every = _all_permutations(n)
        totals = c[torch.arange(n)[None, :], every].sum(dim=1)
        at_least = int((totals >= observed - 1e-12 * max(1.0, abs(observed))).sum())
        spread = float(totals.std()) or 1.0
        return (observed - float(totals.mean())) / spread, math.log(at_least / len(every))
    mean = float(c.sum()) / n
    centred = c - c.mean(dim=1, keepdim=True) - c.mean(dim=0, keepdim=True) + c.mean()
    variance = float(centred.pow(2).sum()) / (n - 1)
    z = (observed - mean) / math.sqrt(max(variance, 1e-300))
    return z, log_normal_sf(z)


@functools.lru_cache(maxsize=EXACT_MAX_UNITS)
def _all_permutations(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)


def fisher_log_p(log_ps: list[float]) -> float:
    """Fisher's method in log space: X = -2 sum ln p_i ~ chi2(2k); its tail has a closed form for even
    degrees of freedom: P(X > x) = exp(-x/2) * sum_{j<k} (x/2)^j / j!."""
    if not log_ps:
        raise ValueError("fisher_log_p needs at least one p-value")
    half = -sum(log_ps)
    if half <= 0:
        return 0.0
    terms = [j * math.log(half) - math.lgamma(j + 1) for j in range(len(log_ps))]
    top = max(terms)
    return min(0.0, -half + top + math.log(sum(math.exp(t - top) for t in terms)))


def bonferroni_log_p(log_p: float, tests: int) -> float:
    return min(0.0, log_p + math.log(tests))


def log10(log_p: float) -> float:
    return log_p / math.log(10)
