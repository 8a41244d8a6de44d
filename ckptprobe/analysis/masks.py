"""Building mask files: a mask expression evaluated on every weight matrix of a base.

Masks over a base model's weight matrices (`mask_select`: principal, low-magnitude,
random) and from runs (`update`: what one fine-tune changed, the bf16-aware rule of
`analysis.update`; `consensus`: changed in at least a fraction `min_agree` of several
runs) are combined by an expression (`mask_expr`): RLVR updates avoid principal weights
and prefer low-magnitude ones, so `safe = low | ~principal` is a one-shot mask for sparse
training. Weight matrices (2-D, and each matrix of a 3-D expert stack) get masks computed;
every other weight follows an explicit `Vectors` policy; what is not a weight (integer
and bool buffers) is never in a mask file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ckptprobe.analysis.bf16 import float32_to_bf16_bits, to_float32
from ckptprobe.analysis.choices import Vectors
from ckptprobe.analysis.grouping import KEYS, grouped
from ckptprobe.analysis.mask_expr import Expr, Kind, parse_expression
from ckptprobe.analysis.mask_select import (DEFAULT_ALPHA, LowThreshold, check_alpha, default_rank, low_mask,
                                            principal_mask, random_mask)
from ckptprobe.analysis.plan import Skipped, SkipCategory, Want, plan_tensors
from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA, CompareMode, default_mode, update_mask
from ckptprobe.analysis.weights import not_a_weight, read_matrix, read_raw
from ckptprobe.errors import InvalidCheckpointError, TensorMismatchError, UsageError
from ckptprobe.io._safetensors import FLOAT_DTYPES
from ckptprobe.io.maskfile import PackedMask, fingerprint
from ckptprobe.io.names import parse_name
from ckptprobe.io.sources import TensorSource

__all__ = ["DEFAULT_ALPHA", "Kind", "LowThreshold", "MaskBuild", "MaskSpec", "MatrixMasks", "TensorMask", "Vectors",
           "build_masks", "fingerprint_as", "group_densities"]


# Kinds defined by other kinds; the rest are atoms computed per matrix.


# ---------------------------------------------------------------- per-matrix masks

@dataclass(frozen=True)
class MaskSpec:
    """Everything besides the base and runs that defines a mask.

    rank None: `default_rank` per matrix. like: the expression whose per-matrix density
    `random` copies. min_agree: the fraction of runs that must have changed an entry for
    `consensus` (an entry is kept when changed in at least ceil(min_agree * runs) runs, and
    at least one). mode/eta/atol: the update rule (`analysis.update`); mode None picks
    bitwise for equal dtypes, bf16 otherwise. method/device: for the SVD engine.
    """

    expression: str
    rank: int | None = None
    alpha: float = DEFAULT_ALPHA
    low_threshold: LowThreshold = LowThreshold.alpha
    like: str | None = None
    seed: int = 0
    min_agree: float = 1.0
    mode: CompareMode | None = None
    eta: float = DEFAULT_ETA
    atol: float = DEFAULT_ATOL
    method: str = "auto"
    device: str | None = None

    def needed_runs(self, n: int) -> int:
        return max(1, math.ceil(round(self.min_agree * n, 9)))


class MatrixMasks:
    """The atom masks of one base matrix, computed on first use and cached.

    name/raw/dtype: the base matrix in storage form; runs: [(storage array, dtype)] of the
    same matrix in each run (`update` needs one, `consensus` several). values: a function
    giving the base matrix's float32 values (`weights.read_matrix`), for formats whose stored
    values are not the weights' (block-scaled FP8); None converts `raw`.
    """

    def __init__(self, name: str, raw: np.ndarray, dtype: str, spec: MaskSpec,
                 runs: Sequence[tuple[np.ndarray, str]] = (), values: Callable[[], np.ndarray] | None = None):
        self.name, self.raw, self.dtype, self.spec, self.runs = name, raw, dtype, spec, runs
        self.rank = None  # k used, once the principal mask is computed
        self._values = values or (lambda: to_float32(raw, dtype))
        self._w = None
        self._cache: dict[str, np.ndarray] = {}

    @property
    def w(self) -> np.ndarray:
        if self._w is None:
            w = self._values()
            if not np.isfinite(w).all():
                raise InvalidCheckpointError(f"{self.name}: the base tensor holds NaN or inf; its principal and "
                                             "low-magnitude masks are undefined",
                                             hint="--exclude it (it then follows --vectors)")
            self._w = w
        return self._w

    def __call__(self, atom: str) -> np.ndarray:
        """The mask of `atom` (a fresh copy: callers may modify it)."""
        if atom not in self._cache:
            self._cache[atom] = self._compute(atom)
        return self._cache[atom].copy()

    def _updates(self) -> Iterator[np.ndarray]:
        """Each run's update mask, one at a time (a consensus of R runs holds one mask and the counts)."""
        s = self.spec
        for raw, dtype in self.runs:
            mode = s.mode or default_mode(self.dtype, dtype)
            yield update_mask(self.raw, raw, self.dtype, dtype, mode, s.eta, s.atol)[0]

    def _compute(self, atom: str) -> np.ndarray:
        s = self.spec
        if atom == "principal":
            from ckptprobe.analysis.svd import check_k

            k = default_rank(self.raw.shape) if s.rank is None else s.rank
            check_k(self.name, self.raw.shape, k)
            self.rank = k
            return principal_mask(self.w, k, s.alpha, s.device, s.method)
        if atom == "low":
            return low_mask(self.w, s.alpha, s.low_threshold)
        if atom == "update":
            return next(self._updates())
        if atom == "consensus":
            changed = np.zeros(self.raw.shape, np.uint16)
            for m in self._updates():
                changed += m
            return changed >= s.needed_runs(len(self.runs))
        if atom == "random":
            like = parse_expression(s.like).evaluate(self)
            return random_mask(self.raw.shape, int(np.count_nonzero(like)), s.seed, self.name)
        raise ValueError(atom)


# ---------------------------------------------------------------- whole models

@dataclass(frozen=True)
class TensorMask:
    """One tensor's mask: `computed` (a 2-D matrix) or set by the vectors policy; `rank` is the k used."""

    name: str
    layer: int | None
    module: str
    shape: tuple[int, ...]
    computed: bool
    count: int  # trainable (True) entries
    rank: int | None = None
    bits: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def group(self) -> str:
        return parse_name(self.name).group

    @property
    def density(self) -> float | None:
        return self.count / self.numel if self.numel else None

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "module": self.module, "shape": list(self.shape),
                "computed": self.computed, "rank": self.rank, "numel": self.numel, "trainable": self.count,
                "density": self.density}


def group_densities(tensors: Sequence[TensorMask], key: str) -> list[dict]:
    """Trainable counts summed per "module", "layer" or "group" (in the order of `grouping.order`), with densities."""
    out = []
    for k, ts in grouped(tensors, key).items():
        n, c = sum(t.numel for t in ts), sum(t.count for t in ts)
        out.append({key: k, "tensors": len(ts), "numel": n, "trainable": c, "density": c / n if n else None})
    return out


@dataclass(frozen=True)
class MaskBuild:
    """Masks for every tensor of a base, bit-packed, with the recipe and base fingerprints to write."""

    recipe: dict
    tensors: tuple[TensorMask, ...]
    fingerprints: dict
    skipped: tuple[Skipped, ...] = ()  # weights that get no computed mask, and why

    def packed(self) -> dict[str, PackedMask]:
        return {t.name: PackedMask(t.shape, t.bits, t.count, {"computed": t.computed, "rank": t.rank})
                for t in self.tensors}

    def rows(self, by: str = "tensor") -> list[dict]:
        """Flat records: one per tensor, or trainable counts per module, layer or group."""
        return [t.to_dict() for t in self.tensors] if by == "tensor" else group_densities(self.tensors, by)

    @property
    def total(self) -> dict:
        n, c = sum(t.numel for t in self.tensors), sum(t.count for t in self.tensors)
        return {"numel": n, "trainable": c, "density": c / n if n else None}

    def to_dict(self) -> dict:
        return {"command": "masks", **self.recipe, "tensors": [t.to_dict() for t in self.tensors],
                "groups": {k: self.rows(k) for k in KEYS}, "total": self.total,
                "skipped": [s.to_dict() for s in self.skipped]}


def fingerprint_as(raw: np.ndarray, dtype: str, target: str) -> str:
    """The fingerprint of storage array `raw` (safetensors `dtype`) after a cast to `target`'s dtype.

    A mask records the fingerprint of the base as stored (e.g. BF16); a copy of that base
    saved in another float dtype (an fp32 export) matches when casting it back gives the same
    bits, as `ckptprobe.train.mask_updates` compares parameters.
    """
    if target == dtype or dtype not in FLOAT_DTYPES or target not in ("BF16", "F16", "F32", "F64"):
        return fingerprint(raw, dtype)
    values = raw.astype(np.float64) if dtype == "F64" else to_float32(raw, dtype)
    cast = {"BF16": lambda x: float32_to_bf16_bits(x.astype(np.float32)), "F16": lambda x: x.astype(np.float16),
            "F32": lambda x: x.astype(np.float32), "F64": lambda x: x.astype(np.float64)}[target]
    return fingerprint(cast(values), target)


def _recipe(spec: MaskSpec, expr: Expr, kind: str | None, base: TensorSource, runs: Sequence[TensorSource],
            vectors: Vectors | None) -> dict:
    atoms = expr.atoms() | (parse_expression(spec.like).atoms() if "random" in expr.atoms() else set())
    r: dict = {"kind": kind or "expression", "expression": str(expr), "base": base.ref}
    if atoms & {"principal", "low"}:
        r |= {"alpha": spec.alpha}
    if "principal" in atoms:
        r |= {"k": "auto" if spec.rank is None else spec.rank,
              "topk_method": str(getattr(spec.method, "value", spec.method))}
    if "low" in atoms:
        r |= {"low_threshold": spec.low_threshold.value}
    if "random" in expr.atoms():
        r |= {"like": spec.like, "seed": spec.seed}
    if atoms & {"update", "consensus"}:
        r |= {"from": [s.ref for s in runs], "mode": spec.mode.value if spec.mode else "auto",
              "eta": spec.eta, "atol": spec.atol}
    if "consensus" in atoms:
        r |= {"min_agree": spec.min_agree, "min_runs": spec.needed_runs(len(runs))}
    r["vectors"] = vectors.value if vectors else None
    return r


def build_masks(base: TensorSource, spec: MaskSpec, runs: Sequence[TensorSource] = (), kind: str | None = None,
                include: Sequence[str] = (), exclude: Sequence[str] = (), vectors: Vectors | None = None,
                progress: Callable[[int], None] | None = None) -> MaskBuild:
    """Compute `spec.expression` for every selected weight matrix of `base`, one matrix at a time
    (a 3-D expert stack `(E, out, in)` matrix by matrix).

    Every other tensor of the base (1-D, left out by include/exclude, non-float) gets an
    all-True (`Vectors.train`) or all-False (`Vectors.freeze`) mask; `vectors` None refuses a
    base that has such tensors, so the choice is always explicit. `runs` are the fine-tunes
    for `update` (exactly one) and `consensus` (two or more); each must hold every computed
    tensor with the base's shape. Memory: one matrix and its masks at a time, plus the
    packed bits (n/8 bytes per tensor). `progress` gets base bytes done after each tensor.
    """
    expr = parse_expression(spec.expression)
    atoms = expr.atoms()
    check_alpha(spec.alpha)
    if "random" in atoms:
        if not spec.like:
            raise UsageError("the random kind needs --like KIND: the kind whose per-matrix density it copies")
        if "random" in parse_expression(spec.like).atoms():
            raise UsageError(f"like={spec.like}: it cannot itself be random", param="like")
        atoms = atoms | parse_expression(spec.like).atoms()
    if spec.rank is not None and spec.rank < 1:
        raise UsageError(f"k={spec.rank}: the rank must be at least 1", param="k")
    if not 0 < spec.min_agree <= 1:
        raise UsageError(f"min_agree={spec.min_agree} is outside (0, 1]", param="min_agree")
    if "update" in atoms and "consensus" in atoms:
        raise UsageError("update and consensus cannot be combined: update reads one --from run, consensus several")
    if "update" in atoms and len(runs) != 1:
        raise UsageError(f"the update kind needs exactly one --from run, got {len(runs)}",
                         hint="for several runs use --kind consensus")
    if "consensus" in atoms and len(runs) < 2:
        raise UsageError(f"the consensus kind needs at least two --from runs, got {len(runs)}",
                         hint="for one run use --kind update")
    if runs and not atoms & {"update", "consensus"}:
        raise UsageError("runs are only read by the update and consensus kinds", param="runs")

    plan = plan_tensors(base, (), Want.matrices, include, exclude, k=spec.rank if "principal" in atoms else None,
                        default_k=default_rank if "principal" in atoms else None)
    computed = [p.name for p in plan.tensors]
    # every weight gets a mask; what is not a weight (an integer buffer) is never in a mask file
    names = [n for n in base.keys() if not not_a_weight(base, n)]
    done = set(computed)
    others = [n for n in names if n not in done]
    small = [s for s in plan.skipped if s.category == SkipCategory.small]
    if not computed and small:
        what = f"k={spec.rank}" if spec.rank is not None else "k=default (min(64, min(m, n) // 16))"
        raise UsageError(f"{what} is larger than the smaller side of every selected matrix "
                         f"({len(small)} skipped, e.g. {small[0].name}: {small[0].reason})", hint="use a smaller k",
                         param="k")
    if not computed:
        raise UsageError("no weight matrix of the base is selected: there is nothing to compute a mask for",
                         hint="check --include/--exclude and -k")
    if others and vectors is None:
        raise UsageError(f"{len(others)} weight(s) get no computed mask (not a matrix, not selected, or smaller than k), "
                         f"e.g. {others[0]}: say whether they train or stay frozen",
                         hint="add --vectors train or --vectors freeze")
    for run in runs:
        keys = set(run.keys())
        for n in computed:
            if n not in keys:
                raise TensorMismatchError(f"{run.ref} has no tensor {n!r}, which the base has",
                                          hint="--from runs must be fine-tunes of BASE (or --exclude the tensor)")
            if run.info(n).shape != base.info(n).shape:
                raise TensorMismatchError(f"{run.ref}: {n} has shape {run.info(n).shape}, the base "
                                          f"{base.info(n).shape}", hint="--from runs must be fine-tunes of BASE")
            if not_a_weight(run, n):
                raise TensorMismatchError(f"{run.ref}: {n} is {run.info(n).dtype}, not a weight as in the base "
                                          f"({base.info(n).dtype})", hint="--from runs must be fine-tunes of BASE")

    fingerprints, tensors = {}, []
    stacked = {p.name: p.stacked for p in plan.tensors}
    for name in names:
        info = base.info(name)
        raw = base.get_array(name)
        fingerprints[name] = fingerprint(raw, info.dtype)
        p = parse_name(name)
        if name in stacked:
            mask, rank = _tensor_mask(base, name, expr, spec, runs, stacked[name])
            tensors.append(TensorMask(name, p.layer, p.module, info.shape, True, int(np.count_nonzero(mask)),
                                      rank, np.packbits(mask.reshape(-1), bitorder="little")))
            del mask
        else:
            trainable = vectors == Vectors.train
            bits = np.full((info.numel + 7) // 8, 0xFF if trainable else 0, np.uint8)
            if trainable and info.numel % 8:
                bits[-1] = (1 << (info.numel % 8)) - 1  # padding bits stay 0, as np.packbits leaves them
            tensors.append(TensorMask(name, p.layer, p.module, info.shape, False,
                                      info.numel if trainable else 0, None, bits))
        del raw
        if progress:
            progress(info.nbytes)
    return MaskBuild(_recipe(spec, expr, kind, base, runs, vectors), tuple(tensors), fingerprints, plan.skipped)


def _tensor_mask(base: TensorSource, name: str, expr: Expr, spec: MaskSpec, runs: Sequence[TensorSource],
                 stacked: bool) -> tuple[np.ndarray, int | None]:
    """The bool mask of one weight tensor (each matrix of an expert stack on its own) and the k used."""
    masks, rank = [], None
    for index in range(base.info(name).shape[0]) if stacked else [None]:
        run_arrays = [(read_raw(r, name, index), r.info(name).dtype) for r in runs]  # empty unless update/consensus
        mm = MatrixMasks(name, read_raw(base, name, index), base.info(name).dtype, spec, run_arrays,
                         values=lambda i=index: read_matrix(base, name, i))
        masks.append(expr.evaluate(mm))
        rank = mm.rank
    return (np.stack(masks) if stacked else masks[0]), rank
