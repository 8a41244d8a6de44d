"""Update profiles of one run over time: does the row/column pattern persist as density grows?

"The Path Not Taken" (Fig. 14) follows one RL run through its checkpoints: the
update density grows, yet the rows and columns that are updated stay the same. Per
checkpoint this module measures the overall update density against the base and, for
the chosen layer's matrices, the row and column ratios of the update mask M
(`rho_i = mean_j M_ij`, `kappa_j = mean_i M_ij`), smoothed by a centred moving average,
with the Pearson correlation between consecutive checkpoints' smoothed profiles and
the stripe index of each (see `consensus.stripe_index`, with R = 1).

`ProfileResult.rows(by)` pools the matrices per module type, layer or group, per checkpoint:
densities as changed / numel summed over the group's matrices (every entry weighs alike),
correlations as the pooled within-matrix correlation (`pooled_correlation`: each matrix's
profiles centred on their own means, so that matrices of different densities do not
correlate merely through their levels), stripe indexes as the median over matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ckptprobe.analysis.consensus_stats import median
from ckptprobe.analysis.grouping import KEYS, grouped
from ckptprobe.analysis.mask_scan import scan
from ckptprobe.analysis.pairing import check_layer, layers_of
from ckptprobe.analysis.plan import SkipCategory, Skipped, Want, plan_tensors
from ckptprobe.analysis.sparsity import sparsity
from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA, CompareMode
from ckptprobe.errors import UsageError
from ckptprobe.io.sources import TensorSource


def moving_average(x: np.ndarray, k: int) -> np.ndarray:
    """(n,) -> (n,) centred moving average over `k` entries; near the ends, the mean of those available."""
    x = np.asarray(x, np.float64)
    k = min(k, len(x))
    if k <= 1:
        return x.copy()
    w = np.ones(k)
    return np.convolve(x, w, "same") / np.convolve(np.ones(len(x)), w, "same")


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two profiles; None if either is constant or holds NaN."""
    if len(a) < 2 or np.isnan(a).any() or np.isnan(b).any() or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def pooled_correlation(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float | None:
    """Pooled within-matrix correlation of profile pairs (a_i, b_i), each pair of one matrix:

        r = sum_i <a_i - mean(a_i), b_i - mean(b_i)> / sqrt(sum_i |a_i - mean(a_i)|^2 * sum_i |b_i - mean(b_i)|^2)

    For one pair, its Pearson correlation. Pairs holding NaN (a checkpoint without the matrix) are
    left out; None when none is left or either side has no variance.
    """
    sab = saa = sbb = 0.0
    for a, b in pairs:
        if np.isnan(a).any() or np.isnan(b).any():
            continue
        a, b = a - a.mean(), b - b.mean()
        sab, saa, sbb = sab + float(a @ b), saa + float(a @ a), sbb + float(b @ b)
    return float(sab / np.sqrt(saa * sbb)) if saa > 0 and sbb > 0 else None


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class TensorProfile:
    """One matrix of the chosen layer over S checkpoints (NaN where a checkpoint lacks it).

    `row`/`col`: (S, rows)/(S, cols) float64 smoothed ratios; `row_corr`/`col_corr`: (S-1,)
    correlation of checkpoint s with s+1; stripe indexes (S,) of the unsmoothed ratios.
    """

    name: str
    layer: int
    module: str
    group: str
    shape: tuple[int, int]
    density: np.ndarray
    row: np.ndarray
    col: np.ndarray
    row_corr: tuple[float | None, ...]
    col_corr: tuple[float | None, ...]
    row_stripe_index: tuple[float | None, ...]
    col_stripe_index: tuple[float | None, ...]
    transposed: bool = False  # stored (in, out): GPT-2's Conv1D (`ParamName.transposed`)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def changed(self) -> tuple[int | None, ...]:
        """(S,) entries changed at each checkpoint; None where it lacks the matrix."""
        return tuple(None if d != d else int(round(d * self.numel)) for d in self.density.tolist())

    def rows(self, checkpoints: Sequence[str]) -> list[dict]:
        """One record per checkpoint; corr: with the previous checkpoint (None for the first)."""
        return [{"name": self.name, "layer": self.layer, "module": self.module, "group": self.group,
                 "checkpoint": c, "numel": self.numel, "changed": self.changed[s], "density": float(self.density[s]),
                 "row_corr": self.row_corr[s - 1] if s else None, "col_corr": self.col_corr[s - 1] if s else None,
                 "row_stripe_index": self.row_stripe_index[s], "col_stripe_index": self.col_stripe_index[s]}
                for s, c in enumerate(checkpoints)]

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "module": self.module, "group": self.group,
                "shape": list(self.shape), "numel": self.numel, "changed": list(self.changed),
                "density": self.density.tolist(), "row_corr": list(self.row_corr), "col_corr": list(self.col_corr),
                "row_stripe_index": list(self.row_stripe_index), "col_stripe_index": list(self.col_stripe_index),
                "row_ratio": self.row.tolist(), "col_ratio": self.col.tolist()}


@dataclass(frozen=True)
class ProfileResult:
    base: str
    checkpoints: tuple[str, ...]
    mode: str
    eta: float
    atol: float
    layer: int
    smooth: int
    changed: tuple[int, ...]  # whole model, per checkpoint
    numel: tuple[int, ...]
    tensors: tuple[TensorProfile, ...]
    skipped: tuple[Skipped, ...]

    @property
    def density(self) -> tuple[float | None, ...]:
        return tuple(c / n if n else None for c, n in zip(self.changed, self.numel))

    def rows(self, by: str = "tensor") -> list[dict]:
        """Flat records of the layer's matrices, one per matrix (or module, layer, group) and checkpoint,
        checkpoints innermost. A group row pools the matrices the checkpoint has (`tensors` counts them):
        numel and changed summed, density = changed / numel, row_corr/col_corr the pooled within-matrix
        correlation with the previous checkpoint (`pooled_correlation`), stripe indexes the median over
        the matrices."""
        if by == "tensor":
            return [r for t in self.tensors for r in t.rows(self.checkpoints)]
        out = []
        for key, ts in grouped(self.tensors, by).items():
            for s, c in enumerate(self.checkpoints):
                have = [t for t in ts if t.changed[s] is not None]
                numel, changed = sum(t.numel for t in have), sum(t.changed[s] for t in have)
                out.append({by: key, "checkpoint": c, "tensors": len(have), "numel": numel, "changed": changed,
                            "density": changed / numel if numel else None,
                            "row_corr": pooled_correlation([(t.row[s - 1], t.row[s]) for t in ts]) if s else None,
                            "col_corr": pooled_correlation([(t.col[s - 1], t.col[s]) for t in ts]) if s else None,
                            "row_stripe_index": median(t.row_stripe_index[s] for t in have),
                            "col_stripe_index": median(t.col_stripe_index[s] for t in have)})
        return out

    def to_dict(self) -> dict:
        return {"command": "profile", "base": self.base, "checkpoints": list(self.checkpoints), "mode": self.mode,
                "eta": self.eta, "atol": self.atol, "layer": self.layer, "smooth": self.smooth,
                "changed": list(self.changed), "numel": list(self.numel), "density": list(self.density),
                "tensors": [t.to_dict() for t in self.tensors], "groups": {key: self.rows(key) for key in KEYS},
                "skipped": [s.to_dict() for s in self.skipped]}


def profile(base: TensorSource, checkpoints: Sequence[TensorSource], layer: int, mode: CompareMode | None = None,
            eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL, smooth: int = 3, include: Sequence[str] = (),
            exclude: Sequence[str] = (), progress: Callable[[int], None] | None = None,
            workers: int | None = None) -> ProfileResult:
    """Profiles of `checkpoints` (one run, in step order) against `base` for the matrices of `layer`.

    Raises UsageError for no checkpoint, `smooth` < 1, or a layer that does not exist.
    """
    if not checkpoints:
        raise UsageError("profile needs at least one checkpoint besides the base")
    if smooth < 1:
        raise UsageError(f"smooth={smooth}: must be at least 1 (1 = no smoothing)", param="smooth")
    check_layer(layer, layers_of(base, include, exclude))
    S = len(checkpoints)
    changed, numel, skipped = [], [], []
    per_name: dict[str, list] = {}
    for s, ckpt in enumerate(checkpoints):
        sp = sparsity(base, ckpt, mode, eta, atol, include, exclude, progress, workers)
        changed.append(sp.total.changed)
        numel.append(sp.total.numel)
        skipped += [Skipped(k.name, f"{ckpt.ref}: {k.reason}", k.category, k.kind) for k in sp.skipped]
        plan = plan_tensors(base, [ckpt], Want.floating, include, exclude, compare=True, mode=mode)
        # the layer's matrices (the rest was counted above); an expert stack is in the densities only
        plans = [p for p in plan.tensors if p.layer == layer and len(p.info.shape) == 2 and p.info.numel]
        if s == 0:
            skipped += [Skipped(p.name, f"an expert stack {p.info.shape}: in the densities, with no row or column "
                                        "profile", SkipCategory.not_matrix, "expert stack, no profile")
                        for p in plan.tensors if p.layer == layer and p.stacked]
        for t in scan(plans, 1, eta, atol, [p.name for p in plans], None, workers):
            per_name.setdefault(t.name, [None] * S)[s] = t
    tensors = []
    for name in [n for n in base.keys() if n in per_name]:  # in the base's order
        steps = per_name[name]
        rows, cols = base.info(name).shape
        row, col = np.full((S, rows), np.nan), np.full((S, cols), np.nan)
        for s, t in enumerate(steps):
            if t is not None:
                row[s], col[s] = moving_average(t.row_ratio, smooth), moving_average(t.col_ratio, smooth)
        density = np.array([t.density[0] if t else np.nan for t in steps])
        first = next(t for t in steps if t is not None)
        tensors.append(TensorProfile(
            name, layer, first.module, first.group, (rows, cols), density, row, col,
            tuple(correlation(row[s], row[s + 1]) for s in range(S - 1)),
            tuple(correlation(col[s], col[s + 1]) for s in range(S - 1)),
            tuple(t.row_stripe_index if t else None for t in steps),
            tuple(t.col_stripe_index if t else None for t in steps), first.transposed))
    return ProfileResult(base.ref, tuple(c.ref for c in checkpoints), mode.value if mode else "auto", eta, atol,
                         layer, smooth, tuple(changed), tuple(numel), tuple(tensors), tuple(skipped))
