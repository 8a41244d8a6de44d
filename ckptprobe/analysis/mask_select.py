"""Selecting entries of one matrix: the principal and low-magnitude masks and their counting rule.

"The Path Not Taken" (Sec. 4.2, 5.1) compares where a fine-tune's updates land with two
masks computed from the base weights W0 alone:

- principal `M_princ = Top_alpha(|W0^(k)|)`: the alpha fraction of entries of largest
  magnitude in the rank-k SVD reconstruction W0^(k) (the weights that carry the top-k
  singular directions);
- low-magnitude `M_low = Bottom_alpha(|W0|)`, or with `LowThreshold.mean` every entry below
  the matrix's mean magnitude (the paper's choice for training masks).

Counting rule (every Top/Bottom selection): a matrix of n entries keeps exactly
`round(alpha * n)` of them, alpha taken as the decimal it is written as and halves rounded
up (alpha = 0.15, n = 10 keeps 2), so alpha = 0 keeps none and alpha = 1 keeps all, and a
tiny alpha can keep none. Entries tied at the threshold value are taken in row-major index
order, lowest first, so a mask is a deterministic function of its inputs.
"""

from __future__ import annotations

import hashlib
from decimal import ROUND_HALF_UP, Decimal

import numpy as np

from ckptprobe.analysis.choices import DEFAULT_ALPHA, LowThreshold
from ckptprobe.errors import UsageError

MAX_RANK = 64


def check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise UsageError(f"alpha={alpha} is outside [0, 1]", hint="alpha is a fraction, e.g. 0.05 for 5%",
                         param="alpha")


def keep_count(alpha: float, n: int) -> int:
    """round(alpha * n), halves up, alpha read as the shortest decimal that prints it (0.15 -> 0.15 exactly)."""
    check_alpha(alpha)
    return int((Decimal(repr(float(alpha))) * n).to_integral_value(ROUND_HALF_UP))


def select_largest(values: np.ndarray, count: int) -> np.ndarray:
    """Bool mask, shaped like `values` (any real dtype, no NaN), of its `count` largest entries.

    Ties at the threshold go to the lowest row-major indices. Cost: one partition (a copy of
    `values`) and two comparisons.
    """
    return _select(values, count, largest=True)


def select_smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of the `count` smallest entries of `values`; ties to the lowest row-major indices."""
    return _select(values, count, largest=False)


def _select(values: np.ndarray, count: int, largest: bool) -> np.ndarray:
    flat = values.reshape(-1)
    n = flat.size
    if not 0 <= count <= n:
        raise ValueError(f"cannot select {count} of {n} entries")
    out = np.zeros(n, bool)
    if count == n:
        out[:] = True
    elif count:
        pos = n - count if largest else count - 1
        t = np.partition(flat, pos)[pos]  # the count-th largest (smallest) value
        np.greater(flat, t, out=out) if largest else np.less(flat, t, out=out)
        need = count - int(np.count_nonzero(out))
        if need:  # entries equal to t: take the first `need` of them in index order
            out[np.flatnonzero(flat == t)[:need]] = True
    return out.reshape(values.shape)


def below_mean(a: np.ndarray) -> np.ndarray:
    """`a < mean(a)` for a float32 array, the mean taken in float64, compared exactly.

    The comparison runs in float32 against the smallest float32 >= the float64 mean, which
    gives the same answer as comparing in float64 without an 8-byte copy of the matrix.
    """
    mean = np.float64(np.mean(a, dtype=np.float64))
    t = np.float32(mean)
    if np.float64(t) < mean:
        t = np.nextafter(t, np.float32(np.inf))
    return a < t


def default_rank(shape: tuple[int, ...]) -> int:
    """k when none is given: min(64, min(m, n) // 16), at least 1.

    64 for 1536-wide and larger matrices (Qwen2.5-1.5B and up), 16 for a 256 x 1536 k_proj,
    8 for the 128-wide example family, 2 for a 32-wide test model: the principal subspace
    stays a small slice of each matrix's spectrum.
    """
    return max(1, min(MAX_RANK, min(shape) // 16))


def principal_mask(w: np.ndarray, k: int, alpha: float, device=None, method: str = "auto") -> np.ndarray:
    """(m, n) float32 -> bool (m, n): Top_alpha(|W^(k)|), W^(k) the rank-k SVD reconstruction.

    The reconstruction comes from the SVD engine (`analysis.svd.rank_k`): an exact thin SVD
    for moderate matrices, a randomized top-k range finder for large ones (seeded, so masks
    are reproducible), computed on `device` (default CPU, where torch is not imported).
    """
    if k == min(w.shape):  # full rank: W^(k) is W itself; an SVD would only add rounding noise to ties
        return select_largest(np.abs(w), keep_count(alpha, w.size))
    from ckptprobe.analysis.svd import rank_k

    a = rank_k(np.asarray(w, np.float32)[None], k, method, device)[0]  # (m, n) float32
    np.abs(a, out=a)
    return select_largest(a, keep_count(alpha, a.size))


def low_mask(w: np.ndarray, alpha: float, threshold: LowThreshold = LowThreshold.alpha) -> np.ndarray:
    """(m, n) float -> bool (m, n): Bottom_alpha(|W|), or |W| < mean |W| for `LowThreshold.mean`."""
    a = np.abs(w)
    if threshold == LowThreshold.mean:
        return below_mean(a)
    return select_smallest(a, keep_count(alpha, a.size))


def random_mask(shape: tuple[int, ...], count: int, seed: int, name: str) -> np.ndarray:
    """Exactly `count` True entries at uniformly random positions, seeded by `seed` and the tensor `name`.

    The name enters the seed so a tensor's mask does not depend on which others were selected.
    """
    name_key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng([seed, name_key])
    keys = rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)  # ties are rare and broken by index
    return select_smallest(keys, count)
