"""Cross-run consensus results: per tensor, pooled per group, and for a whole comparison.

See `consensus_stats` for the statistics and `mask_scan` for how the counts are taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from ckptprobe.analysis.consensus_stats import (bernoulli_jaccard, jaccard_matrix, median, off_diagonal_mean,
                                                off_diagonal_means, poisson_binomial)
from ckptprobe.analysis.grouping import KEYS, grouped
from ckptprobe.analysis.plan import Skipped


POOL_BATCH = 1024  # tensors stacked at once (`summaries`, `pool`): a few arrays of POOL_BATCH * R * R float64


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
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
    transposed: bool = False  # stored (in, out): GPT-2's Conv1D (`ParamName.transposed`)

    # Derived arrays are computed once per tensor, through `tensor_stats` (which takes a stack of
    # tensors at once: a MoE checkpoint has 100,000 of them), and read-only.
    @cached_property
    def _stats(self) -> TensorStats:
        return tensor_stats([self], len(self.changed))

    @property
    def valid(self) -> np.ndarray:
        """(R,) bool: the runs that took part."""
        return self._stats.valid[0]

    @property
    def density(self) -> np.ndarray:
        """(R,) float64 fraction of entries changed per run; NaN for runs left out."""
        return self._stats.density[0]

    @property
    def jaccard(self) -> np.ndarray:
        return self._stats.jaccard[0]

    @property
    def bernoulli(self) -> np.ndarray:
        return self._stats.bernoulli[0]

    @property
    def expected_hist(self) -> np.ndarray:
        """(len(runs)+1,) expected `hist` if the runs' masks were independent with their densities."""
        return self._stats.expected[0, :len(self.runs) + 1]

    def summary(self) -> dict:
        """Flat numbers for a table or CSV row (no R x R matrices)."""
        return summaries([self], len(self.changed))[0]

    def to_dict(self) -> dict:
        return summaries([self], len(self.changed), matrices=True)[0]


@dataclass(frozen=True, eq=False)
class TensorStats:
    """Per-tensor statistics of T tensors over R runs, stacked along a first axis (read-only)."""

    valid: np.ndarray  # (T, R) bool: the runs that took part
    changed: np.ndarray  # (T, R) int64, the tensors' counts stacked
    inter: np.ndarray  # (T, R, R) int64
    numel: np.ndarray  # (T,) int64
    density: np.ndarray  # (T, R) float64, NaN for runs left out
    jaccard: np.ndarray  # (T, R, R) float64, NaN where a run is left out or a union is empty
    bernoulli: np.ndarray  # (T, R, R) float64, its independent-Bernoulli baseline
    expected: np.ndarray  # (T, R+1) float64: each tensor's expected `hist`, zero past len(runs)+1


def tensor_stats(tensors: Sequence[TensorConsensus], R: int) -> TensorStats:
    """The derived statistics of `tensors` in a few numpy calls on stacked arrays: the same values
    as one tensor at a time (runs left out get probability 0 in the Poisson-binomial programme,
    which leaves it exactly as it was)."""
    T = len(tensors)
    valid = np.zeros((T, R), bool)
    for i, t in enumerate(tensors):
        valid[i, list(t.runs)] = True
    changed = np.array([t.changed for t in tensors], np.int64).reshape(T, R)
    inter = np.array([t.inter for t in tensors], np.int64).reshape(T, R, R)
    numel = np.array([t.numel for t in tensors], np.int64)
    density = np.where(valid, changed / np.maximum(numel, 1)[:, None], np.nan)
    jaccard = np.where(valid[:, :, None] & valid[:, None, :], jaccard_matrix(inter, changed), np.nan)
    expected = numel[:, None] * poisson_binomial(np.where(valid, density, 0.0))
    return TensorStats(*map(_frozen, (valid, changed, inter, numel, density, jaccard, bernoulli_jaccard(density),
                                      expected)))


def summaries(tensors: Sequence[TensorConsensus], n_runs: int, matrices: bool = False) -> list[dict]:
    """`TensorConsensus.summary()` of each tensor (with `matrices`, its `to_dict()`: the R x R
    Jaccard and baseline too), computed POOL_BATCH tensors at a time on stacked arrays."""
    R, out = n_runs, []
    for lo in range(0, len(tensors), POOL_BATCH):
        batch = tensors[lo:lo + POOL_BATCH]
        st = tensor_stats(batch, R)
        finite = ~np.isnan(st.density)
        density_mean = np.nansum(st.density, axis=1) / np.maximum(finite.sum(axis=1), 1)
        none = [None] * len(batch)
        columns = zip(batch, st.valid.tolist(), st.density.tolist(), density_mean.tolist(), finite.any(axis=1),
                      off_diagonal_means(st.jaccard), off_diagonal_means(st.bernoulli), st.expected.tolist(),
                      st.jaccard.tolist() if matrices else none, st.bernoulli.tolist() if matrices else none)
        for t, valid, d, d_mean, any_finite, j, b, expected, jac, bern in columns:
            full = len(t.runs) == R and t.numel > 0
            row = {
                "name": t.name, "layer": t.layer, "module": t.module, "group": t.group,
                "shape": list(t.shape), "numel": t.numel, "runs": list(t.runs),
                "density": d, "density_mean": d_mean if any_finite else None,
                "changed": [int(c) if v else None for c, v in zip(t.changed.tolist(), valid)],
                "nonfinite": int(t.nonfinite.sum()),
                "jaccard_mean": j, "bernoulli_mean": b, "lift": j / b if j is not None and b else None,
                "all_runs": float(t.hist[-1] / t.numel) if full else None,
                "all_runs_expected": expected[R] / t.numel if full else None,
                "consensus_hist": t.hist.tolist(), "expected_hist": expected[:len(t.runs) + 1],
                "row_stripe_index": t.row_stripe_index, "col_stripe_index": t.col_stripe_index,
            }
            if matrices:
                row.update(jaccard=jac, bernoulli=bern)
            out.append(row)
    return out


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
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
            key_name: self.key, "tensors": self.tensors, "numel": self.numel, "density": self.density.tolist(),
            "density_mean": float(np.nanmean(self.density)) if finite else None,
            "jaccard_mean": self.jaccard_mean, "bernoulli_mean": self.bernoulli_mean, "lift": self.lift,
            "all_runs": float(self.hist[-1] / total) if total else None,
            "all_runs_expected": float(self.expected_hist[-1] / total) if total else None,
            "consensus_hist": self.hist.tolist(), "expected_hist": self.expected_hist.tolist(),
            "row_stripe_index": self.row_stripe_index, "col_stripe_index": self.col_stripe_index,
        }

    def to_dict(self, key_name: str = "key") -> dict:
        return {**self.summary(key_name), "jaccard": self.jaccard.tolist(), "bernoulli": self.bernoulli.tolist()}


def _terms(tensors: Sequence[TensorConsensus], R: int) -> list[np.ndarray]:
    """Each tensor's terms of the sums of `pool`, stacked along a first axis of len(tensors): intersections,
    unions, their expectations (R, R), changed and numel (R,) over the runs taking part, and the histogram
    and its expectation (R+1,) of tensors all R runs took part in (zero for the others)."""
    N = len(tensors)
    st = tensor_stats(tensors, R)
    valid, inter, numel = st.valid, st.inter, st.numel
    both = valid[:, :, None] & valid[:, None, :]
    n = st.changed.astype(np.float64)
    p = np.where(valid, st.density, 0.0)
    pq = p[:, :, None] * p[:, None, :]
    size = numel.astype(np.float64)[:, None, None]
    full = np.array([len(t.runs) == R for t in tensors], bool)
    hist = np.array([t.hist if f else np.zeros(R + 1, np.int64) for t, f in zip(tensors, full)], np.int64)
    return [np.where(both, inter, 0), np.where(both, n[:, :, None] + n[:, None, :] - inter, 0),
            np.where(both, size * pq, 0), np.where(both, size * (p[:, :, None] + p[:, None, :] - pq), 0),
            np.where(valid, n, 0), np.where(valid, numel[:, None], 0), hist.reshape(N, R + 1),
            np.where(full[:, None], st.expected, 0.0)]


def pool(key, tensors: Sequence[TensorConsensus], n_runs: int) -> GroupConsensus:
    """Pool per-tensor counts into one `GroupConsensus` (see its docstring for how).

    The tensors' terms are stacked (POOL_BATCH tensors at a time) and summed along the tensor axis,
    which numpy adds in order, tensor after tensor: the sums of a loop over the tensors in a few numpy
    calls. Counts are summed as integers, then taken to float64 (exact below 2^53).
    """
    R = n_runs
    sums = [x.sum(axis=0) for x in _terms(tensors[:POOL_BATCH], R)]
    for i in range(POOL_BATCH, len(tensors), POOL_BATCH):  # the running sums first, then the next batch, in order
        batch = _terms(tensors[i:i + POOL_BATCH], R)
        sums = [np.concatenate([acc[None], x]).sum(axis=0) for acc, x in zip(sums, batch)]
    inter, union, e_inter, e_union, changed, numel, hist, expected = sums
    inter, numel = inter.astype(np.float64), numel.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / union, np.nan)
        bern = np.where(e_union > 0, e_inter / e_union, np.nan)
        density = np.where(numel > 0, changed / numel, np.nan)
    bern[np.diag_indices(R)] = np.where(density > 0, 1.0, np.nan)

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

    @cached_property
    def total(self) -> GroupConsensus:
        return pool("all", self.tensors, len(self.runs))

    def by(self, key: str) -> dict:
        """GroupConsensus per "module", "layer" or "group", in a stable order (layers ascending, None last)."""
        return {k: pool(k, ts, len(self.runs)) for k, ts in grouped(self.tensors, key).items()}

    def rows(self, by: str = "tensor") -> list[dict]:
        """Flat records for a table or CSV (no R x R matrices): one per tensor or per module, layer or group."""
        if by == "tensor":
            return summaries(self.tensors, len(self.runs))
        return [g.summary(by) for g in self.by(by).values()]

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
            "tensors": summaries(self.tensors, len(self.runs), matrices=True),
            "groups": {key: [g.to_dict(key) for g in self.by(key).values()] for key in KEYS},
            "layer": self.layer,
            "profiles": [{"name": t.name, "module": t.module, "row_ratio": t.row_ratio.tolist(),
                          "col_ratio": t.col_ratio.tolist()} for t in self.layer_tensors()],
            "skipped": [s.to_dict() for s in self.skipped],
        }

