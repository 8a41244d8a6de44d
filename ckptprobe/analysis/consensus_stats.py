"""Cross-run consensus statistics, on small arrays of counts.

"The Path Not Taken" (Sec. 2.2, Fig. 2, 3, 8) compares the update masks M^(r) of several
RL runs from one base. From per-tensor counts this module computes:

- pairwise Jaccard `J(A, B) = |A n B| / |A u B|` and the independent-Bernoulli
  baseline `E[J] = pq / (p + q - pq)` (p, q the two densities);
- the expected consensus histogram of independent runs: a Poisson-binomial law, exactly;
- a *stripe index* per axis of the row and column ratios (ours, not the paper's).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

def jaccard_matrix(inter: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Pairwise Jaccard from counts: (..., R, R) intersections, (..., R) changed counts -> (..., R, R)
    float64, for one tensor or a stack of them.

    `J_rs = I_rs / (n_r + n_s - I_rs)`; NaN where the union is empty. The diagonal is 1
    (each run against itself) wherever the run changed anything.
    """
    inter = np.asarray(inter, np.float64)
    n = np.asarray(changed, np.float64)
    union = n[..., :, None] + n[..., None, :] - inter
    return np.divide(inter, union, out=np.full_like(union, np.nan), where=union > 0)


def bernoulli_jaccard(density: np.ndarray) -> np.ndarray:
    """(..., R) densities -> (..., R, R) expected Jaccard of independent Bernoulli masks, `pq / (p + q - pq)`.

    For two masks of n entries, independent, with densities p and q, |A n B| ~ npq and
    |A u B| ~ n(p + q - pq); their ratio is E[J] up to O(1/n). NaN where p = q = 0.
    The diagonal is set to 1 (a mask against itself).
    """
    p = np.asarray(density, np.float64)
    pq = p[..., :, None] * p[..., None, :]
    union = p[..., :, None] + p[..., None, :] - pq
    out = np.divide(pq, union, out=np.full_like(union, np.nan), where=union > 0)
    diagonal = np.arange(p.shape[-1])
    out[..., diagonal, diagonal] = np.where(p > 0, 1.0, np.nan)
    return out


def off_diagonal_mean(m: np.ndarray) -> float | None:
    """Mean of the defined (non-NaN) off-diagonal entries of a square matrix; None if there is none."""
    m = np.asarray(m, np.float64)
    vals = m[_off_diagonal(len(m))]
    vals = vals[~np.isnan(vals)]
    return float(np.add.reduce(vals) / vals.size) if vals.size else None  # vals.mean(), without its overhead


def off_diagonal_means(m: np.ndarray) -> list:
    """`off_diagonal_mean` of each matrix of a (T, R, R) stack, in a few numpy calls."""
    vals = m[:, _off_diagonal(m.shape[1])]
    count = (~np.isnan(vals)).sum(axis=1)
    means = np.nansum(vals, axis=1) / np.maximum(count, 1)
    return [float(x) if c else None for x, c in zip(means.tolist(), count.tolist())]


@functools.lru_cache(maxsize=64)
def _off_diagonal(R: int) -> np.ndarray:
    """(R, R) bool, True off the diagonal (read-only: shared between calls)."""
    mask = ~np.eye(R, dtype=bool)
    mask.flags.writeable = False
    return mask


def poisson_binomial(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """(..., R) per-run probabilities -> (..., R+1) pmf of the number of successes of independent
    Bernoullis, for one set of runs or a stack of them.

    Exact dynamic programme over runs: after run r, pmf[k] = P(k of the first r+1 runs
    succeed). With equal p this is Binomial(R, p). A run of probability 0 leaves the pmf
    exactly as it was: a stack can leave a tensor's absent runs out that way.
    """
    p = np.asarray(p, np.float64)
    R = p.shape[-1]
    pmf = np.zeros((*p.shape[:-1], R + 1))
    pmf[..., 0] = 1.0
    for r in range(R):
        pr = p[..., r, None]
        pmf[..., 1:r + 2] = pmf[..., 1:r + 2] * (1 - pr) + pmf[..., :r + 1] * pr
        pmf[..., 0] *= 1 - p[..., r]
    return pmf


def stripe_index(ratios: np.ndarray, density: np.ndarray, n_other: int) -> float | None:
    """Variance of row (or column) ratios of a consensus over its value for unstructured masks.

    `ratios` (n,) are `rho_i = mean_j C_ij` over `n_other` entries each, with
    `C = (1/R) sum_r M^(r)` and run densities `density` (R,). If every M^(r) were iid
    Bernoulli(p_r) entries, `Var C_ij = sum_r p_r (1 - p_r) / R^2` and a mean of
    `n_other` independent entries has variance `Var C_ij / n_other`; the sample
    variance (ddof=1) of the n ratios is an unbiased estimate of it. The index is
    their quotient: ~1 without structure, >> 1 when whole rows (columns) are
    preferred by the runs. This index is ckptprobe's, not the paper's.
    The null takes one density per run for the whole matrix, so strong structure along
    one axis pulls the other axis's index below 1 (rows of very different densities
    make column means vary less than uniform entries would): read < 1 as "none".
    None when there are fewer than 2 ratios or the null variance is 0 (every p_r 0 or 1).
    """
    p = np.asarray(density, np.float64)
    null = float(np.sum(p * (1 - p))) / len(p) ** 2 / n_other if len(p) and n_other else 0.0
    if len(ratios) < 2 or null <= 0:
        return None
    # np.var(ratios, ddof=1), step by step as numpy computes it (the same float64 value), without its
    # per-call overhead: this runs twice per tensor, and a model may hold tens of thousands of tiny ones
    r = np.asarray(ratios, np.float64)
    d = r - np.add.reduce(r) / r.size
    return float(np.add.reduce(d * d) / (r.size - 1) / null)


def median(values) -> float | None:
    """The median of the values that are not None (the mean of the middle two for an even count, as
    numpy's), or None if there is none. Plain Python: `np.median` imports numpy.ma (~20 ms a run)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return float(vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2)
