"""Do a fine-tune's updates land on principal weights? Overlap of update masks with base masks.

"The Path Not Taken" (Sec. 4.2, Fig. 5): for each 2-D base matrix W0, the update mask M
of a fine-tune (entries the bf16-aware rule of `analysis.update` calls changed) is compared
with the principal mask P = Top_alpha(|W0^(k)|), the low-magnitude mask L and P & ~L (see
`analysis.masks` for their exact definitions and counting rule). For each mask X:

    overlap(X) = |M & X| / |M|        random baseline = |X| / n (the density of X)

since a mask M of the same size placed at random would overlap X by X's density on
average. overlap / baseline < 1 is sub-random: RLVR updates avoid principal weights
(ratio well below 1) and favour low-magnitude ones (ratio above 1). Counts are summed
before dividing, so module, layer and overall figures weigh every entry alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np

from ckptprobe.analysis.grouping import KEYS, grouped
from ckptprobe.analysis.mask_select import DEFAULT_ALPHA, LowThreshold, check_alpha, default_rank
from ckptprobe.analysis.masks import MaskSpec, MatrixMasks
from ckptprobe.analysis.plan import Skipped, SkipCategory, Want, check_distinct, plan_tensors
from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA, CompareMode, default_mode, update_mask
from ckptprobe.analysis.weights import not_a_weight, read_matrix, read_raw
from ckptprobe.errors import InvalidCheckpointError, UsageError
from ckptprobe.io.names import parse_name
from ckptprobe.io.sources import TensorSource

MASKS = ("principal", "low", "principal_not_low")


@dataclass(frozen=True)
class OverlapCounts:
    """Entry counts of one matrix (or a sum of matrices) and one fine-tune.

    updated = |M|; principal, low, principal_not_low = |X|; updated_* = |M & X|.
    """

    numel: int = 0
    updated: int = 0
    principal: int = 0
    low: int = 0
    principal_not_low: int = 0
    updated_principal: int = 0
    updated_low: int = 0
    updated_principal_not_low: int = 0

    def __add__(self, other: "OverlapCounts") -> "OverlapCounts":
        return OverlapCounts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    @property
    def update_density(self) -> float | None:
        return self.updated / self.numel if self.numel else None

    def overlap(self, mask: str) -> float | None:
        """|M & X| / |M|; None when nothing was updated."""
        return getattr(self, f"updated_{mask}") / self.updated if self.updated else None

    def baseline(self, mask: str) -> float | None:
        """|X| / n: the expected overlap of a random mask."""
        return getattr(self, mask) / self.numel if self.numel else None

    def ratio(self, mask: str) -> float | None:
        """overlap / baseline: < 1 is sub-random, > 1 super-random; None when either is undefined or 0."""
        o, b = self.overlap(mask), self.baseline(mask)
        return o / b if o is not None and b else None

    def to_dict(self) -> dict:
        d = {**asdict(self), "update_density": self.update_density}
        for m in MASKS:
            d |= {f"overlap_{m}": self.overlap(m), f"baseline_{m}": self.baseline(m), f"ratio_{m}": self.ratio(m)}
        return d


@dataclass(frozen=True)
class MatrixOverlap:
    name: str
    finetuned: str
    layer: int | None
    module: str
    shape: tuple[int, ...]
    rank: int
    alpha: float
    counts: OverlapCounts
    expert: int | None = None  # the matrix's index in a 3-D expert stack `(E, out, in)`

    def to_dict(self) -> dict:
        return {"name": self.name, "expert": self.expert, "finetuned": self.finetuned, "layer": self.layer,
                "module": self.module, "shape": list(self.shape), "rank": self.rank, "alpha": self.alpha,
                **self.counts.to_dict()}


@dataclass(frozen=True)
class PrincipalResult:
    base: str
    finetuned: tuple[str, ...]
    rank: int | None  # None: default_rank per matrix
    alpha: float
    low_threshold: str
    mode: str  # the mode asked for, or "auto"
    eta: float
    atol: float
    method: str  # how W0^(k) was computed: auto | exact | randomized (`analysis.svd.TopkMethod`)
    matrices: tuple[MatrixOverlap, ...]
    skipped: tuple[Skipped, ...]

    def by(self, key: str, finetuned: str) -> dict:
        """Counts of one fine-tune summed per "module", "layer" or "group", in the order of `grouping.order`."""
        mine = [m for m in self.matrices if m.finetuned == finetuned]
        return {k: sum((m.counts for m in ms), OverlapCounts())
                for k, ms in grouped(mine, key, lambda m: getattr(m, key) if key != "group" else
                                     parse_name(m.name).group).items()}

    def rows(self, by: str = "tensor") -> list[dict]:
        """Flat records: one per matrix and fine-tune, or per module/layer and fine-tune."""
        if by == "tensor":
            return [m.to_dict() for m in self.matrices]
        return [{"finetuned": ft, by: k, **c.to_dict()} for ft in self.finetuned for k, c in self.by(by, ft).items()]

    @property
    def total(self) -> dict[str, OverlapCounts]:
        """Counts summed over every matrix, per fine-tune (in argument order)."""
        return {ft: sum((m.counts for m in self.matrices if m.finetuned == ft), OverlapCounts()) for ft in self.finetuned}

    def to_dict(self) -> dict:
        total = self.total
        return {
            "command": "principal", "base": self.base, "finetuned": list(self.finetuned),
            "rank": "auto" if self.rank is None else self.rank, "alpha": self.alpha,
            "low_threshold": self.low_threshold,
            "mode": self.mode, "eta": self.eta, "atol": self.atol, "topk_method": self.method,
            "matrices": [m.to_dict() for m in self.matrices],
            "groups": {key: self.rows(key) for key in KEYS},
            "total": [{"finetuned": ft, **total[ft].to_dict()} for ft in self.finetuned],
            "skipped": [s.to_dict() for s in self.skipped],
        }


def _modes(base: TensorSource, finetuned: Sequence[TensorSource], name: str, mode: CompareMode | None) -> list:
    out = []
    for ft in finetuned:
        a, b = base.info(name).dtype, ft.info(name).dtype
        m = mode or default_mode(a, b)
        if m == CompareMode.bitwise and a != b:
            raise UsageError(f"{name}: bitwise comparison needs one dtype, base has {a}, {ft.ref} has {b}",
                             hint="use --mode bf16 or --mode eta")
        out.append(m)
    return out


def principal_overlap(base: TensorSource, finetuned: Sequence[TensorSource], rank: int | None = None,
                      alpha: float = DEFAULT_ALPHA, low_threshold: LowThreshold = LowThreshold.alpha,
                      mode: CompareMode | None = None, eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL,
                      include: Sequence[str] = (), exclude: Sequence[str] = (), device=None,
                      method: str = "auto", progress: Callable[[int], None] | None = None) -> PrincipalResult:
    """Overlap of each fine-tune's update mask with the base's principal and low-magnitude masks.

    Every weight matrix present with one shape in the base and all fine-tunes is measured (each
    matrix of a 3-D expert stack on its own); the base masks are computed once per matrix (one
    matrix in memory at a time) and shared by all fine-tunes. `rank` None uses
    `default_rank` per matrix; a matrix whose smaller side is below the rank is skipped.
    `device` and `method` (auto | exact | randomized) go to the SVD engine's `rank_k`.
    `progress`, if given, gets the bytes read after each matrix.
    """
    check_alpha(alpha)
    if not finetuned:
        raise UsageError("give at least one fine-tuned checkpoint")
    check_distinct(finetuned)
    plan = plan_tensors(base, finetuned, Want.matrices, include, exclude, compare=True, mode=mode, k=rank,
                        default_k=default_rank)
    skipped = list(plan.skipped)
    spec = MaskSpec("principal", alpha=alpha, low_threshold=low_threshold, device=device, method=method)
    matrices = []
    for p in plan.tensors:
        m, n = p.matrix_shape
        for index in range(p.matrices) if p.stacked else [None]:
            raw = read_raw(base, p.name, index)
            mm = MatrixMasks(p.name, raw, p.info.dtype, replace(spec, rank=p.k),
                             values=lambda name=p.name, i=index: read_matrix(base, name, i))
            which = f" (expert {index})" if p.stacked else ""
            try:
                if not mm.w.any():  # every weight ties at 0: no principal direction, no magnitude order
                    skipped.append(Skipped(p.name, "the base matrix is all zeros" + which, SkipCategory.zero,
                                           "all-zero base"))
                    continue
                P, L = mm("principal"), mm("low")
            except InvalidCheckpointError:  # NaN/inf in the base: no SVD, no magnitude order
                skipped.append(Skipped(p.name, "the base holds NaN or inf" + which, SkipCategory.nonfinite,
                                       "NaN/inf in base"))
                continue
            PnL = P & ~L
            sizes = dict(numel=m * n, principal=int(np.count_nonzero(P)), low=int(np.count_nonzero(L)),
                         principal_not_low=int(np.count_nonzero(PnL)))
            for ft in p.runs:
                M = update_mask(raw, read_raw(ft.source, p.name, index), p.info.dtype, ft.info.dtype, ft.mode,
                                eta, atol)[0]
                counts = OverlapCounts(updated=int(np.count_nonzero(M)),
                                       updated_principal=int(np.count_nonzero(M & P)),
                                       updated_low=int(np.count_nonzero(M & L)),
                                       updated_principal_not_low=int(np.count_nonzero(M & PnL)), **sizes)
                matrices.append(MatrixOverlap(p.name, ft.source.ref, p.layer, p.module, (m, n), p.k, alpha, counts,
                                              index))
            if progress:
                progress(m * n * sum(s.info.itemsize for s in (p, *p.runs)))
    return PrincipalResult(base.ref, tuple(f.ref for f in finetuned), rank, alpha, LowThreshold(low_threshold).value,
                           mode.value if mode else "auto", eta, atol, str(getattr(method, "value", method)),
                           tuple(matrices), tuple(skipped))


def check_matrix(base: TensorSource, finetuned: Sequence[TensorSource], name: str) -> None:
    """UsageError unless `name` is a weight matrix of the base held with its shape by every fine-tune."""
    if name not in base.keys():
        raise UsageError(f"matrix={name}: {base.ref} has no such tensor",
                         hint="tensor names are listed by --by tensor", param="matrix")
    info = base.info(name)
    if len(info.shape) != 2 or min(info.shape) == 0 or not_a_weight(base, name):
        raise UsageError(f"matrix={name}: not a 2-D float matrix ({info.dtype} {tuple(info.shape)})", param="matrix")
    for ft in finetuned:
        if name not in ft.keys() or ft.info(name).shape != info.shape:
            raise UsageError(f"matrix={name}: {ft.ref} has no tensor of that name and shape", param="matrix")


def matrix_masks(base: TensorSource, finetuned: Sequence[TensorSource], name: str, rank: int | None = None,
                 alpha: float = DEFAULT_ALPHA, low_threshold: LowThreshold = LowThreshold.alpha,
                 mode: CompareMode | None = None, eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL,
                 device=None, method: str = "auto") -> dict[str, np.ndarray]:
    """The masks of one matrix, for pictures (Fig. 18): {"principal": P, "low": L, ft.ref: M, ...}, bool (m, n)."""
    check_matrix(base, finetuned, name)
    info = base.info(name)
    raw = base.get_array(name)
    k = default_rank(info.shape) if rank is None else rank
    mm = MatrixMasks(name, raw, info.dtype, MaskSpec("principal", rank=k, alpha=alpha, low_threshold=low_threshold,
                                                     device=device, method=method))
    out = {"principal": mm("principal"), "low": mm("low")}
    for ft, m in zip(finetuned, _modes(base, finetuned, name, mode)):
        out[ft.ref] = update_mask(raw, ft.get_array(name), info.dtype, ft.info(name).dtype, m, eta, atol)[0]
    return out
