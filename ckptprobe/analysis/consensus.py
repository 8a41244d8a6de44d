"""Cross-run consensus: do independent RL runs from one base change the same weights?

"The Path Not Taken" (Sec. 2.2, Fig. 2, 3, 8) compares the update masks M^(r) of
several RL runs from one base: their pairwise Jaccard overlap is far above what
independent runs of the same densities would give, and the consensus ratio
`C_ij = (1/R) sum_r M_ij^(r)` forms row and column stripes. Per tensor this module
computes, for R runs:

- pairwise Jaccard `J(A, B) = |A n B| / |A u B|` and the independent-Bernoulli
  baseline `E[J] = pq / (p + q - pq)` (p, q the two densities);
- the consensus histogram (how many entries were changed by 0, 1, ..., R runs) and
  its expectation for independent runs: a Poisson-binomial law, computed exactly;
- row and column ratios `rho_i = mean_j C_ij`, `kappa_j = mean_i C_ij`, and a
  *stripe index* per axis (ours, not the paper's; see `stripe_index`).

Memory is bounded by a row block, not by the model or by R: tensors are read in
blocks of whole rows (the base's and all runs' blocks together map about
BLOCK_BYTES); each run's mask is bit-packed (`np.packbits`) and added into a small
per-entry counter, chunk by chunk; Jaccard intersections are popcounts of ANDed
packed words. Blocks run on a small thread pool (numpy releases the GIL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ckptprobe.analysis._parallel import parallel_map
from ckptprobe.analysis.pairing import Skipped, selected
from ckptprobe.analysis.update import (DEFAULT_ATOL, DEFAULT_ETA, EXPONENT16, CompareMode, default_mode,
                                      has_nonfinite16, update_mask)
from ckptprobe.errors import UsageError
from ckptprobe.io._safetensors import TensorInfo
from ckptprobe.io.names import MODULE_ORDER, parse_name
from ckptprobe.io.sources import MultiFileSource, TensorSource

BLOCK_BYTES = 48 << 20  # per task, the base's and all runs' blocks together (mapped page cache)
CHUNK = 1 << 17  # entries per numpy step inside a block: base, run, mask and counts stay in L2 (~1 MB)
HEAT_SIZE = 256  # heatmaps are block-averaged to at most this many cells per side


# ---------------------------------------------------------------- the statistics, on small arrays

def jaccard_matrix(inter: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Pairwise Jaccard from counts: (R, R) intersections, (R,) changed counts -> (R, R) float64.

    `J_rs = I_rs / (n_r + n_s - I_rs)`; NaN where the union is empty. The diagonal is 1
    (each run against itself) wherever the run changed anything.
    """
    inter = np.asarray(inter, np.float64)
    n = np.asarray(changed, np.float64)
    union = n[:, None] + n[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def bernoulli_jaccard(density: np.ndarray) -> np.ndarray:
    """(R,) densities -> (R, R) expected Jaccard of independent Bernoulli masks, `pq / (p + q - pq)`.

    For two masks of n entries, independent, with densities p and q, |A n B| ~ npq and
    |A u B| ~ n(p + q - pq); their ratio is E[J] up to O(1/n). NaN where p = q = 0.
    The diagonal is set to 1 (a mask against itself).
    """
    p = np.asarray(density, np.float64)
    pq = p[:, None] * p[None, :]
    union = p[:, None] + p[None, :] - pq
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, pq / union, np.nan)
    diag = np.diag_indices_from(out)
    out[diag] = np.where(p > 0, 1.0, np.nan)
    return out


def off_diagonal_mean(m: np.ndarray) -> float | None:
    """Mean of the defined (non-NaN) off-diagonal entries of a square matrix; None if there is none."""
    m = np.asarray(m, np.float64)
    vals = m[~np.eye(len(m), dtype=bool)]
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if vals.size else None


def poisson_binomial(p: Sequence[float]) -> np.ndarray:
    """(R,) per-run probabilities -> (R+1,) pmf of the number of successes of independent Bernoullis.

    Exact dynamic programme over runs: after run r, pmf[k] = P(k of the first r+1 runs
    succeed). With equal p this is Binomial(R, p).
    """
    pmf = np.zeros(len(p) + 1)
    pmf[0] = 1.0
    for r, pr in enumerate(p):
        pmf[1:r + 2] = pmf[1:r + 2] * (1 - pr) + pmf[:r + 1] * pr
        pmf[0] *= 1 - pr
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
    return float(np.var(np.asarray(ratios, np.float64), ddof=1) / null)


# ---------------------------------------------------------------- results

def _listed(a: np.ndarray | None) -> list | None:
    """float array -> nested list with None for NaN (JSON has no NaN)."""
    if a is None:
        return None
    return np.where(np.isnan(a), None, a).tolist() if a.dtype.kind == "f" else a.tolist()


@dataclass(frozen=True)
class TensorConsensus:
    """One tensor across the R runs. Arrays are indexed by run over all R runs.

    `runs`: indices of the runs that took part (the others did not match the base);
    `changed` (R,) int64 and `inter` (R, R) int64 (diagonal = changed) are 0 for runs left out;
    `hist` (len(runs)+1,) int64 counts entries changed by exactly k of the runs that took part;
    `row_ratio`/`col_ratio` ((rows,), (cols,) float64) are kept only for the chosen layer;
    `heatmap` is the block-averaged consensus C (at most HEAT_SIZE per side, float64),
    chosen layer only, with `heat_block` the block size.
    """

    name: str
    layer: int | None
    module: str
    group: str
    shape: tuple[int, ...]
    runs: tuple[int, ...]
    numel: int
    changed: np.ndarray
    nonfinite: np.ndarray
    inter: np.ndarray
    hist: np.ndarray
    row_stripe_index: float | None = None
    col_stripe_index: float | None = None
    row_ratio: np.ndarray | None = None
    col_ratio: np.ndarray | None = None
    heatmap: np.ndarray | None = None
    heat_block: int | None = None

    @property
    def valid(self) -> np.ndarray:
        v = np.zeros(len(self.changed), bool)
        v[list(self.runs)] = True
        return v

    @property
    def density(self) -> np.ndarray:
        """(R,) float64 fraction of entries changed per run; NaN for runs left out."""
        d = self.changed / max(self.numel, 1)
        return np.where(self.valid, d, np.nan)

    @property
    def jaccard(self) -> np.ndarray:
        j = jaccard_matrix(self.inter, self.changed)
        return np.where(np.outer(self.valid, self.valid), j, np.nan)

    @property
    def bernoulli(self) -> np.ndarray:
        return bernoulli_jaccard(self.density)

    @property
    def expected_hist(self) -> np.ndarray:
        """(len(runs)+1,) expected `hist` if the runs' masks were independent with their densities."""
        return self.numel * poisson_binomial(self.density[list(self.runs)])

    def summary(self) -> dict:
        """Flat numbers for a table or CSV row (no R x R matrices)."""
        d = self.density
        j, b = off_diagonal_mean(self.jaccard), off_diagonal_mean(self.bernoulli)
        full = len(self.runs) == len(d) and self.numel > 0
        return {
            "name": self.name, "layer": self.layer, "module": self.module, "group": self.group,
            "shape": list(self.shape), "numel": self.numel, "runs": list(self.runs),
            "density": _listed(d), "density_mean": float(np.nanmean(d)) if np.isfinite(d).any() else None,
            "changed": [int(c) if v else None for c, v in zip(self.changed, self.valid)],
            "nonfinite": int(self.nonfinite.sum()),
            "jaccard_mean": j, "bernoulli_mean": b, "lift": j / b if j is not None and b else None,
            "all_runs": float(self.hist[-1] / self.numel) if full else None,
            "all_runs_expected": float(self.expected_hist[-1] / self.numel) if full else None,
            "consensus_hist": self.hist.tolist(), "expected_hist": self.expected_hist.tolist(),
            "row_stripe_index": self.row_stripe_index, "col_stripe_index": self.col_stripe_index,
        }

    def to_dict(self) -> dict:
        return {**self.summary(), "jaccard": _listed(self.jaccard), "bernoulli": _listed(self.bernoulli)}


@dataclass(frozen=True)
class GroupConsensus:
    """Tensors pooled (a module type, a layer, the whole model).

    Jaccard pools counts: `J_rs = sum_t I_rs,t / sum_t U_rs,t` over the tensors both runs
    took part in. Its baseline pools expectations the same way, each tensor with its own
    densities (`sum_t n_t p q / sum_t n_t (p + q - pq)`), so runs that merely favour the
    same *tensors* do not count as agreeing on *coordinates*. `hist` and `expected_hist`
    sum the tensors all R runs took part in; stripe indexes are medians over tensors.
    """

    key: object
    tensors: int
    numel: int
    density: np.ndarray  # (R,)
    jaccard: np.ndarray  # (R, R)
    bernoulli: np.ndarray  # (R, R)
    hist: np.ndarray  # (R+1,)
    expected_hist: np.ndarray  # (R+1,)
    row_stripe_index: float | None
    col_stripe_index: float | None

    @property
    def jaccard_mean(self) -> float | None:
        return off_diagonal_mean(self.jaccard)

    @property
    def bernoulli_mean(self) -> float | None:
        return off_diagonal_mean(self.bernoulli)

    @property
    def lift(self) -> float | None:
        """Observed over expected mean Jaccard (1: no more overlap than chance)."""
        j, b = self.jaccard_mean, self.bernoulli_mean
        return j / b if j is not None and b else None

    def summary(self, key_name: str = "key") -> dict:
        """Flat numbers for a table or CSV row (no R x R matrices)."""
        total = self.hist.sum()
        finite = np.isfinite(self.density).any()
        return {
            key_name: self.key, "tensors": self.tensors, "numel": self.numel, "density": _listed(self.density),
            "density_mean": float(np.nanmean(self.density)) if finite else None,
            "jaccard_mean": self.jaccard_mean, "bernoulli_mean": self.bernoulli_mean, "lift": self.lift,
            "all_runs": float(self.hist[-1] / total) if total else None,
            "all_runs_expected": float(self.expected_hist[-1] / total) if total else None,
            "consensus_hist": self.hist.tolist(), "expected_hist": self.expected_hist.tolist(),
            "row_stripe_index": self.row_stripe_index, "col_stripe_index": self.col_stripe_index,
        }

    def to_dict(self, key_name: str = "key") -> dict:
        return {**self.summary(key_name), "jaccard": _listed(self.jaccard), "bernoulli": _listed(self.bernoulli)}


def pool(key, tensors: Sequence[TensorConsensus], n_runs: int) -> GroupConsensus:
    """Pool per-tensor counts into one `GroupConsensus` (see its docstring for how)."""
    R = n_runs
    inter, union, e_inter, e_union = (np.zeros((R, R)) for _ in range(4))
    changed, numel = np.zeros(R), np.zeros(R)
    hist, expected = np.zeros(R + 1, np.int64), np.zeros(R + 1)
    for t in tensors:
        v = t.valid
        both = np.outer(v, v)
        n = t.changed.astype(np.float64)
        p = np.where(v, n / max(t.numel, 1), 0.0)
        inter += np.where(both, t.inter, 0)
        union += np.where(both, n[:, None] + n[None, :] - t.inter, 0)
        pq = np.outer(p, p)
        e_inter += np.where(both, t.numel * pq, 0)
        e_union += np.where(both, t.numel * (p[:, None] + p[None, :] - pq), 0)
        changed += np.where(v, n, 0)
        numel += np.where(v, t.numel, 0)
        if len(t.runs) == R:
            hist += t.hist
            expected += t.expected_hist
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / union, np.nan)
        bern = np.where(e_union > 0, e_inter / e_union, np.nan)
        density = np.where(numel > 0, changed / numel, np.nan)
    bern[np.diag_indices(R)] = np.where(density > 0, 1.0, np.nan)

    def median(vals):
        vals = [x for x in vals if x is not None]
        return float(np.median(vals)) if vals else None

    return GroupConsensus(key, len(tensors), sum(t.numel for t in tensors), density, jac, bern, hist, expected,
                          median(t.row_stripe_index for t in tensors), median(t.col_stripe_index for t in tensors))


@dataclass(frozen=True)
class ConsensusResult:
    base: str
    runs: tuple[str, ...]
    mode: str  # the mode asked for, or "auto"
    eta: float
    atol: float
    layer: int | None  # the layer whose ratio profiles and heatmaps were kept
    tensors: tuple[TensorConsensus, ...]
    skipped: tuple[Skipped, ...]

    @property
    def total(self) -> GroupConsensus:
        return pool("all", self.tensors, len(self.runs))

    def by(self, key: str) -> dict:
        """GroupConsensus per "module", "layer" or "group", in a stable order (layers ascending, None last)."""
        groups: dict = {}
        for t in self.tensors:
            groups.setdefault(getattr(t, key), []).append(t)
        if key == "module":
            order = {m: i for i, m in enumerate(MODULE_ORDER)}
            keys = sorted(groups, key=lambda k: (order.get(k, len(order)), k))
        elif key == "layer":
            keys = sorted(groups, key=lambda k: (k is None, k or 0))
        else:
            keys = list(groups)
        return {k: pool(k, groups[k], len(self.runs)) for k in keys}

    def layer_tensors(self) -> list[TensorConsensus]:
        """The chosen layer's 2-D tensors (those with ratio profiles), in checkpoint order."""
        return [t for t in self.tensors if t.row_ratio is not None]

    def to_dict(self) -> dict:
        total = self.total
        return {
            "command": "consensus", "base": self.base, "runs": list(self.runs), "mode": self.mode,
            "eta": self.eta, "atol": self.atol,
            **{k: v for k, v in total.to_dict().items() if k not in ("key", "tensors", "row_stripe_index",
                                                                     "col_stripe_index")},
            "tensors": [t.to_dict() for t in self.tensors],
            "groups": {key: [g.to_dict(key) for g in self.by(key).values()] for key in ("module", "layer")},
            "layer": self.layer,
            "profiles": [{"name": t.name, "module": t.module, "row_ratio": t.row_ratio.tolist(),
                          "col_ratio": t.col_ratio.tolist()} for t in self.layer_tensors()],
            "skipped": [s.to_dict() for s in self.skipped],
        }


# ---------------------------------------------------------------- streaming over checkpoints

@dataclass(frozen=True)
class Plan:
    """One tensor to scan: the base and, per run taking part, (run index, source, dtype, mode)."""

    name: str
    base: TensorSource
    info: TensorInfo  # the base's
    runs: tuple[tuple[int, TensorSource, str, CompareMode], ...]
    keep_profile: bool = False  # keep row/column ratios and a heatmap (the chosen layer's matrices)

    @property
    def rows_cols(self) -> tuple[int, int]:
        """The tensor seen as (rows, cols): (out, in) for a matrix; (numel, 1) otherwise (no profiles)."""
        shape = self.info.shape
        return (shape[0], shape[1]) if len(shape) == 2 else (self.info.numel, 1)


def plan_tensors(base: TensorSource, runs: Sequence[TensorSource], mode: CompareMode | None = None,
                 include: Sequence[str] = (), exclude: Sequence[str] = (),
                 keep_layer: int | None = None) -> tuple[list[Plan], list[Skipped]]:
    """Pair each selected base tensor with the runs holding it with the same shape.

    A run missing a tensor, or holding it with another shape, is left out of that
    tensor only (reported in `skipped`); a tensor no run matches is skipped whole.
    Matrices of layer `keep_layer` keep their ratio profiles and heatmaps.
    Raises UsageError if `mode` is bitwise and a run stores a tensor in another dtype.
    """
    plans, skipped = [], []
    run_keys = [set(r.keys()) for r in runs]
    for name in base.keys():
        if not selected(name, include, exclude):
            continue
        info = base.info(name)
        taking = []
        for i, (src, keys) in enumerate(zip(runs, run_keys)):
            if name not in keys:
                skipped.append(Skipped(name, f"missing in run {i} ({src.ref}); run left out of this tensor"))
                continue
            other = src.info(name)
            if other.shape != info.shape:
                skipped.append(Skipped(name, f"shape {info.shape} in base vs {other.shape} in run {i} ({src.ref}); "
                                             "run left out of this tensor"))
                continue
            m = mode or default_mode(info.dtype, other.dtype)
            if m == CompareMode.bitwise and info.dtype != other.dtype:
                raise UsageError(f"{name}: bitwise comparison needs one dtype, base has {info.dtype}, "
                                 f"{src.ref} has {other.dtype}", hint="use --mode bf16 or --mode eta")
            taking.append((i, src, other.dtype, m))
        if taking:
            keep = (keep_layer is not None and len(info.shape) == 2 and info.numel > 0
                    and parse_name(name).layer == keep_layer)
            plans.append(Plan(name, base, info, tuple(taking), keep))
    seen = set(base.keys())
    for i, (src, keys) in enumerate(zip(runs, run_keys)):
        for name in src.keys():
            if name not in seen and selected(name, include, exclude):
                seen.add(name)
                skipped.append(Skipped(name, f"only in run {i} ({src.ref}) (missing in base)"))
    return plans, skipped


def _chunk_mask(x: np.ndarray, y: np.ndarray, dtype_a: str, dtype_b: str, mode: CompareMode, eta: float,
                atol: float, exp: int | None, out: np.ndarray) -> tuple[np.ndarray, int]:
    """One chunk's update mask: flat storage arrays -> (changed bool (n,), nonfinite count).

    `exp` is given (the 16-bit exponent mask) only when the fast path may apply: bitwise
    mode, one 16-bit float dtype on both sides, and a base chunk already known to hold
    no +-0 and no inf/NaN. Then "changed" is exactly "bits differ" unless the run holds
    inf/NaN in the chunk; such chunks, and all others, take `update_mask`.
    """
    if exp is not None:
        yu = y.view(np.uint16)
        ne = np.not_equal(x.view(np.uint16), yu, out=out[:x.size])  # first, so y is in cache for the checks
        if not has_nonfinite16(yu, exp):
            return ne, 0
    changed, nonfinite = update_mask(x, y, dtype_a, dtype_b, mode, eta, atol)
    return changed, int(np.count_nonzero(nonfinite))


def _histogram(counter: np.ndarray, n_runs: int) -> np.ndarray:
    """(n,) per-entry counts in 0..n_runs -> (n_runs+1,) int64 histogram."""
    if n_runs < 24:  # a SIMD compare-and-count per value beats bincount's cast to intp for small R
        h = [np.count_nonzero(counter == k) for k in range(1, n_runs + 1)]
        return np.array([counter.size - sum(h), *h], np.int64)
    return np.bincount(counter, minlength=n_runs + 1).astype(np.int64)


@dataclass
class _Block:
    """What one row block adds to its tensor's statistics (R' = runs taking part)."""

    changed: np.ndarray  # (R',) int64
    nonfinite: np.ndarray  # (R',) int64
    inter: np.ndarray  # (R', R') int64, strict upper triangle
    hist: np.ndarray  # (R'+1,) int64
    row_sums: np.ndarray | None  # (block rows,) int64: per row, sum of the per-entry counts
    col_sums: np.ndarray | None  # (cols,) int64
    heat: tuple[np.ndarray, np.ndarray] | None  # (grid row indices (g,), (g, grid cols) int64 sums)


def heat_block(rows: int, cols: int) -> int:
    """Cell side of a heatmap of (rows, cols): the one `report.figures.block_average` uses for HEAT_SIZE."""
    return max(1, -(-max(rows, cols) // HEAT_SIZE))


def _chunk_rows(cols: int) -> int:
    """Rows per chunk: about CHUNK entries, and a multiple of 8 entries so packed bits stay byte-aligned."""
    rows = max(1, CHUNK // max(cols, 1))
    align = 8 // math.gcd(cols, 8) if cols else 1
    return -(-rows // align) * align


def block_rows(plan: Plan) -> int:
    """Rows per task: the base and every run's block together map about BLOCK_BYTES, in whole chunks."""
    rows, cols = plan.rows_cols
    per_row = max(cols, 1) * plan.info.itemsize * (1 + len(plan.runs))
    chunk = _chunk_rows(cols)
    return max(1, BLOCK_BYTES // per_row // chunk) * chunk


def _pair_counts(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit-packed masks (R, W) uint64 -> (popcounts (R,), intersections (R, R) int64).

    `inter[k, l]` (k < l, strict upper triangle) is `|M_k n M_l|`: AND the words of run k
    with those of every later run at once, count bits, sum.
    """
    R = len(words)
    inter = np.zeros((R, R), np.int64)
    for k in range(R - 1):
        inter[k, k + 1:] = np.bitwise_count(words[k] & words[k + 1:]).sum(axis=1, dtype=np.int64)
    return np.bitwise_count(words).sum(axis=1, dtype=np.int64), inter


def _scan_block(plan: Plan, lo: int, hi: int, eta: float, atol: float) -> _Block:
    """Rows [lo, hi) of one tensor in the base and every run taking part.

    The base's and the runs' blocks are mapped once; work then goes chunk by chunk
    (a few rows), every run in turn, so that the chunk's base, run, mask and counter
    stay in cache, and the histogram and row/column sums of the chunk's counts are
    taken while they are there.
    """
    rows, cols = plan.rows_cols
    n, R, dtype = (hi - lo) * cols, len(plan.runs), plan.info.dtype
    matrix = len(plan.info.shape) == 2
    x = plan.base.read(plan.name, lo * cols, hi * cols)
    ys = [src.read(plan.name, lo * cols, hi * cols) for _, src, _, _ in plan.runs]
    fast = [EXPONENT16.get(dtype) if mode == CompareMode.bitwise and run_dtype == dtype else None
            for _, _, run_dtype, mode in plan.runs]
    step = _chunk_rows(cols) * cols
    packed = np.zeros((R, -(-n // 64) * 8), np.uint8)  # per run, the mask bit-packed, in whole uint64 words
    nonfinite, hist = np.zeros(R, np.int64), np.zeros(R + 1, np.int64)
    counts = np.zeros(n if plan.keep_profile else min(step, n), np.uint8 if R < 256 else np.uint16)
    ne, mag = np.empty(min(step, n), bool), np.empty(min(step, n), np.uint16)
    row_sums = np.zeros(hi - lo, np.int64) if matrix else None
    col_sums = np.zeros(cols, np.int64) if matrix else None
    for c in range(0, n, step):
        xc = x[c:c + step]
        cc = counts[c:c + step] if plan.keep_profile else counts[:xc.size]
        cc[:] = 0
        base_ok = True  # the base holds no +-0 and no inf/NaN here: the fast path is exact
        if any(e is not None for e in fast):
            m = np.bitwise_and(xc.view(np.uint16), 0x7FFF, out=mag[:xc.size])
            base_ok = bool(m.min() > 0 and m.max() < EXPONENT16[dtype])
        for k, (_, _, run_dtype, mode) in enumerate(plan.runs):
            m, nf = _chunk_mask(xc, ys[k][c:c + step], dtype, run_dtype, mode, eta, atol,
                                fast[k] if base_ok else None, ne)
            nonfinite[k] += nf
            packed[k, c // 8:(c + m.size + 7) // 8] = np.packbits(m, bitorder="little")
            np.add(cc, m.view(np.uint8), out=cc, casting="unsafe")
        hist += _histogram(cc, R)
        if matrix:
            c2 = cc.reshape(-1, cols)
            # Sums in the narrowest type that cannot overflow: summing into uint16 is ~4x faster than int64.
            r0 = c // cols
            row_sums[r0:r0 + len(c2)] = c2.sum(axis=1, dtype=np.uint16 if cols * R < 1 << 16 else np.int64)
            col_sums += c2.sum(axis=0, dtype=np.uint16 if len(c2) * R < 1 << 16 else np.int64)
    del x, ys  # unmap
    changed, inter = _pair_counts(packed.view(np.uint64))
    heat = None
    if plan.keep_profile and n:
        # Sums of the counts over heatmap cells of side b: columns first, then the rows of
        # each cell that fall in this block (a cell may span two blocks; the caller adds).
        b = heat_block(rows, cols)
        by_col = np.add.reduceat(counts.reshape(hi - lo, cols), np.arange(0, cols, b), axis=1, dtype=np.int64)
        starts = np.union1d([0], np.flatnonzero(np.arange(lo, hi) % b == 0))
        heat = ((lo + starts) // b, np.add.reduceat(by_col, starts, axis=0))
    return _Block(changed, nonfinite, inter, hist, row_sums, col_sums, heat)


class _Acc:
    """Running totals of one tensor's blocks."""

    def __init__(self, plan: Plan):
        R = len(plan.runs)
        rows, cols = plan.rows_cols
        self.changed, self.nonfinite = np.zeros(R, np.int64), np.zeros(R, np.int64)
        self.inter, self.hist = np.zeros((R, R), np.int64), np.zeros(R + 1, np.int64)
        matrix = len(plan.info.shape) == 2
        self.row_sums = np.zeros(rows, np.int64) if matrix else None
        self.col_sums = np.zeros(cols, np.int64) if matrix else None
        if plan.keep_profile:
            b = heat_block(rows, cols)
            self.heat = np.zeros((-(-rows // b), -(-cols // b)), np.int64)

    def add(self, lo: int, hi: int, blk: _Block) -> None:
        self.changed += blk.changed
        self.nonfinite += blk.nonfinite
        self.inter += blk.inter
        self.hist += blk.hist
        if blk.row_sums is not None:
            self.row_sums[lo:hi] = blk.row_sums
            self.col_sums += blk.col_sums
        if blk.heat is not None:
            self.heat[blk.heat[0]] += blk.heat[1]


def _finish(plan: Plan, acc: _Acc, n_runs: int) -> TensorConsensus:
    idx = [i for i, *_ in plan.runs]
    R = len(idx)
    rows, cols = plan.rows_cols
    numel = plan.info.numel
    changed, nonfinite = np.zeros(n_runs, np.int64), np.zeros(n_runs, np.int64)
    changed[idx], nonfinite[idx] = acc.changed, acc.nonfinite
    inter = np.zeros((n_runs, n_runs), np.int64)
    inter[np.ix_(idx, idx)] = acc.inter + acc.inter.T + np.diag(acc.changed)
    p = acc.changed / max(numel, 1)
    rho = kappa = heat = None
    row_idx = col_idx = None
    b = None
    if acc.row_sums is not None:
        rho = acc.row_sums / (R * cols) if cols else np.zeros(rows)
        kappa = acc.col_sums / (R * rows) if rows else np.zeros(cols)
        row_idx, col_idx = stripe_index(rho, p, cols), stripe_index(kappa, p, rows)
    if plan.keep_profile:
        b = heat_block(rows, cols)
        cells = np.outer(np.minimum(b, rows - b * np.arange(acc.heat.shape[0])),
                         np.minimum(b, cols - b * np.arange(acc.heat.shape[1])))
        heat = acc.heat / (cells * R)
    else:
        rho = kappa = None
    pn = parse_name(plan.name)
    return TensorConsensus(plan.name, pn.layer, pn.module, pn.group, plan.info.shape, tuple(idx), numel,
                           changed, nonfinite, inter, acc.hist.copy(), row_idx, col_idx, rho, kappa, heat, b)


def scan(plans: Sequence[Plan], n_runs: int, eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL,
         progress: Callable[[int], None] | None = None, workers: int | None = None) -> Iterator[TensorConsensus]:
    """Stream every planned tensor in row blocks; yield one `TensorConsensus` per plan, in order.

    `n_runs` is R, the length of the per-run arrays. `progress`, if given, is called with
    the bytes read after each block.
    """
    tasks = []  # (plan index, first row, end row): small, since forked workers get them pickled
    for i, plan in enumerate(plans):
        rows, step = plan.rows_cols[0], block_rows(plan)
        tasks += [(i, lo, min(lo + step, rows)) for lo in range(0, max(rows, 1), step)]

    def work(task):
        i, lo, hi = task
        return _scan_block(plans[i], lo, hi, eta, atol)

    local = all(isinstance(s, MultiFileSource) for p in plans for s in (p.base, *(r[1] for r in p.runs)))
    if workers is None and sum(p.info.numel * (1 + len(p.runs)) for p in plans) < 1 << 23:
        workers = 1  # starting workers costs more than scanning a small model
    current, acc = None, None
    for (i, lo, hi), blk in zip(tasks, parallel_map(work, tasks, workers, fork=local)):
        plan = plans[i]
        if progress:
            progress((hi - lo) * plan.rows_cols[1] * plan.info.itemsize * (1 + len(plan.runs)))
        if plan is not current:
            if current is not None:
                yield _finish(current, acc, n_runs)
            current, acc = plan, _Acc(plan)
        acc.add(lo, hi, blk)
    if current is not None:
        yield _finish(current, acc, n_runs)


def layers_of(base: TensorSource, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[int]:
    """Sorted layer indices among the base's selected tensor names."""
    return sorted({p.layer for n in base.keys() if selected(n, include, exclude)
                   for p in [parse_name(n)] if p.layer is not None})


def check_layer(layer: int, layers: Sequence[int]) -> None:
    """UsageError naming the valid range if `layer` is not one of `layers`."""
    if layer not in layers:
        valid = f"{layers[0]}..{layers[-1]}" if layers and list(layers) == list(range(layers[0], layers[-1] + 1)) \
            else ", ".join(map(str, layers)) or "none (no tensor name has a layer index)"
        raise UsageError(f"layer {layer} does not exist; valid layers: {valid}")


def consensus(base: TensorSource, runs: Sequence[TensorSource], mode: CompareMode | None = None,
              eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL, include: Sequence[str] = (),
              exclude: Sequence[str] = (), layer: int | None = None,
              progress: Callable[[int], None] | None = None, workers: int | None = None) -> ConsensusResult:
    """Compare the update masks of R >= 2 `runs` of one `base`, tensor by tensor.

    `mode=None` compares bitwise where a run shares the base's dtype and after rounding
    to bf16 where it does not. Matrices of `layer` (if given) keep their row/column
    ratio profiles and block-averaged consensus heatmaps. Raises UsageError for fewer
    than two runs or a layer that does not exist.
    """
    if len(runs) < 2:
        raise UsageError(f"consensus needs at least two runs, got {len(runs)}",
                         hint="give the base and two or more fine-tunes of it: ckptprobe consensus BASE RUN1 RUN2 ...")
    if layer is not None:
        check_layer(layer, layers_of(base, include, exclude))
    plans, skipped = plan_tensors(base, runs, mode, include, exclude, layer)
    tensors = tuple(scan(plans, len(runs), eta, atol, progress, workers))
    return ConsensusResult(base.ref, tuple(r.ref for r in runs), mode.value if mode else "auto", eta, atol,
                           layer, tensors, tuple(skipped))
