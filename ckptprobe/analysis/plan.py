"""The planner: which tensors an analysis reads, paired with which checkpoints, and why the rest is not.

Every analysis starts here. `plan_tensors(base, runs, want, ...)` looks at names, dtypes
and shapes only (headers, no data) and returns a `Plan`: one `TensorPlan` per tensor to
analyse, each with the runs that hold it and the comparison mode per run, and one
`Skipped` per tensor (or tensor and run) left out, with a category and a reason. Every
precondition that can fail is checked here, before any data is read:

- a filter that matches nothing, and checkpoints that share no tensor name (with a guess
  of why: another architecture, a constant name prefix), are errors;
- bitwise comparison of tensors stored in two dtypes is a usage error;
- what is not a weight (integer and bool buffers), what is not a matrix when matrices are
  wanted, a matrix whose smaller side is below the k asked for, a tensor missing from a
  checkpoint or stored there with another shape: skips, never errors.

3-D expert stacks `(E, out, in)` are planned as E matrices of `(out, in)`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase
from typing import Callable, Sequence

from ckptprobe.analysis.pairing import globs, selected, why_disjoint
from ckptprobe.analysis.choices import CompareMode, default_mode
from ckptprobe.analysis.weights import is_expert_stack, not_a_weight
from ckptprobe.errors import InvalidCheckpointError, NoMatchingTensorsError, TensorMismatchError, UsageError
from ckptprobe.io._safetensors import TensorInfo
from ckptprobe.io.names import ParamName, conv1d_layout, is_bias, parse_name
from ckptprobe.io.sources import TensorSource


class Want(str, Enum):
    """What an analysis reads: every floating-point tensor, or weight matrices (2-D, or stacks of them)."""

    floating = "floating"
    matrices = "matrices"


class SkipCategory(str, Enum):
    not_weight = "not-weight"  # integer or bool buffer
    vector = "1-D"  # norms, biases: not a matrix
    bias = "bias"  # a stack of bias vectors, (E, n) or more: rows are vectors, not a matrix
    scalar = "0-D"
    not_matrix = "not-matrix"  # 3-D (not an expert stack) or more
    small = "small"  # the smaller side is below the k asked for
    missing = "missing"  # in one checkpoint only
    shape = "shape"  # stored with another shape (a resized vocabulary)
    nonfinite = "nonfinite"  # the base holds NaN/inf: no spectrum, no magnitude order
    zero = "zero"  # the base matrix is all zeros: every weight ties, no principal direction


@dataclass(frozen=True)
class Skipped:
    """A tensor left out of an analysis (or one run left out of a tensor), and why.

    `kind` is the short phrase the one-line summary counts ("1-D (norms, biases)", "int64
    buffer"); `reason` the full sentence for this tensor.
    """

    name: str
    reason: str
    category: SkipCategory
    kind: str

    def to_dict(self) -> dict:
        return {"name": self.name, "category": self.category.value, "reason": self.reason}


def skip_summary(skipped: Sequence[Skipped]) -> str | None:
    """One line for a run's skips: "skipped 57 tensors: 56 1-D (norms, biases), 1 int64 buffer"; None if none.

    Counts skips by kind, most frequent first. A tensor left out for several runs (consensus)
    counts once per run.
    """
    if not skipped:
        return None
    counts = Counter(s.kind for s in skipped)
    parts = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    n = len(skipped)
    return f"skipped {n} tensor{'s' if n != 1 else ''}: {parts}"


@dataclass(frozen=True)
class Side:
    """One run as a tensor plan reads it: `index` among the runs, its source, its header, how it is compared."""

    index: int
    source: TensorSource
    info: TensorInfo
    mode: CompareMode | None  # None when the analysis compares no bits (drift, spectrum)


@dataclass(frozen=True, eq=False)
class TensorPlan:
    """One base tensor to analyse with the runs that hold it with the base's shape.

    `k` is the top-k asked for (or the analysis's default for this shape) when matrices are
    wanted. A 3-D expert stack is `matrices` = E matrices of `matrix_shape`; a 2-D tensor one.
    """

    name: str
    base: TensorSource
    info: TensorInfo
    runs: tuple[Side, ...]
    param: ParamName
    k: int | None = None

    @property
    def layer(self) -> int | None:
        return self.param.layer

    @property
    def module(self) -> str:
        return self.param.module

    @property
    def group(self) -> str:
        return self.param.group

    @property
    def stacked(self) -> bool:
        return is_expert_stack(self.name, self.info.shape)

    @property
    def matrices(self) -> int:
        """Matrices in the tensor: E for an expert stack, 1 for a 2-D tensor, 0 otherwise."""
        shape = self.info.shape
        return shape[0] if self.stacked else int(len(shape) == 2)

    @property
    def matrix_shape(self) -> tuple[int, int] | None:
        """(rows, cols) of each matrix as stored, or None."""
        shape = self.info.shape
        return tuple(shape[1:]) if self.stacked else tuple(shape) if len(shape) == 2 else None

    @property
    def rows_cols(self) -> tuple[int, int]:
        """The tensor seen as rows of its last axis: (prod(shape[:-1]), shape[-1]); (1, 1) for a scalar."""
        shape = self.info.shape
        return (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)


@dataclass(frozen=True)
class Plan:
    tensors: tuple[TensorPlan, ...]
    skipped: tuple[Skipped, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the plan reads once: every planned tensor in the base and in each run taking part."""
        return sum(t.info.nbytes + sum(r.info.nbytes for r in t.runs) for t in self.tensors)


def _skip(name: str, category: SkipCategory, reason: str, kind: str) -> Skipped:
    return Skipped(name, reason, category, kind)


def _not_matrix(name: str, info: TensorInfo) -> Skipped | None:
    """Why a weight is not a matrix (or a stack of them), or None."""
    ndim = len(info.shape)
    if ndim >= 2 and is_bias(name):
        return _skip(name, SkipCategory.bias, f"{ndim}-D bias {info.shape}, a stack of vectors, not a matrix",
                     "bias stacks (vectors)")
    if ndim == 2 or is_expert_stack(name, info.shape):
        return None
    if ndim == 1:
        return _skip(name, SkipCategory.vector, "1-D, not a matrix", "1-D (norms, biases)")
    if ndim == 0:
        return _skip(name, SkipCategory.scalar, "0-D, not a matrix", "0-D")
    return _skip(name, SkipCategory.not_matrix, f"{ndim}-D {info.shape}, not a matrix or an expert stack",
                 f"{ndim}-D")


def _check_filters(base: TensorSource, include: Sequence[str], exclude: Sequence[str]) -> None:
    names = base.keys()
    for p in include:
        if not any(fnmatchcase(n, g) for g in globs((p,)) for n in names):
            raise NoMatchingTensorsError(f"--include {p!r} matches no tensor of {base.ref}",
                                         hint="names are globs over full tensor names, e.g. '*.layers.13.*'")
    if names and not any(selected(n, include, exclude) for n in names):
        raise NoMatchingTensorsError(f"--include/--exclude leave no tensor of {base.ref} "
                                     f"(include {list(include)}, exclude {list(exclude)})")


def check_distinct(finetuned: Sequence[TensorSource]) -> None:
    """Refuse a fine-tuned checkpoint named twice where results are kept per checkpoint reference
    (spectrum, principal): its matrices would count twice in every group and total."""
    twice = [ref for ref, n in Counter(f.ref for f in finetuned).items() if n > 1]
    if twice:
        raise UsageError(f"{twice[0]} is given twice", hint="name each fine-tuned checkpoint once")


def require_tensors(sources: Sequence[TensorSource]) -> None:
    """Refuse a checkpoint that holds no tensor (an empty header, an index with an empty weight map)."""
    empty = next((s for s in sources if not s.keys()), None)
    if empty is not None:
        raise InvalidCheckpointError(f"{empty.ref} holds no tensors (an empty header or index)")


def plan_tensors(base: TensorSource, runs: Sequence[TensorSource], want: Want = Want.floating,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), compare: bool = False,
                 mode: CompareMode | None = None, k: int | None = None,
                 default_k: Callable[[tuple[int, int]], int] | None = None, min_side: int = 1,
                 partial: bool = False) -> Plan:
    """Plan an analysis of `base` against `runs` (see the module docstring for what is checked).

    want: `Want.floating` (every weight) or `Want.matrices` (2-D weights and expert stacks,
    each matrix with `k`, or `default_k(shape)` when k is None; a matrix whose smaller side
    is below max(k, min_side) is skipped). compare: the runs' bits are compared with the base's
    (`mode` per run, None: bitwise for one dtype, bf16 otherwise). partial: a run that lacks a
    tensor (or holds another shape) is left out of that tensor only, and the tensor is planned
    while one run holds it; else the tensor is skipped.
    Raises InvalidCheckpointError (a checkpoint without tensors), NoMatchingTensorsError, TensorMismatchError
    (no name in common) or UsageError.
    """
    if k is not None and k < 1:
        raise UsageError(f"k={k}: the rank must be at least 1", param="k")
    require_tensors([base, *runs])
    _check_filters(base, include, exclude)
    names = [n for n in base.keys() if selected(n, include, exclude)]
    c_weights = [n for n in base.keys() if n.endswith((".c_attn.weight", ".c_fc.weight"))]
    conv1d = conv1d_layout({n: base.info(n).shape for n in c_weights})
    run_keys = [set(r.keys()) for r in runs]
    for run, keys in zip(runs, run_keys):
        common = sum(n in keys for n in base.keys())
        if not common:
            guess, hint = why_disjoint(base, run)
            raise TensorMismatchError(f"{base.ref} and {run.ref} have no tensor name in common: {guess}", hint=hint)
        if 2 * common < len(base.keys()):  # mostly disjoint: a constant prefix may explain it
            guess, hint = why_disjoint(base, run)
            if hint:
                raise TensorMismatchError(f"{base.ref} and {run.ref} have only {common} of {len(base.keys())} "
                                          f"tensor names in common: {guess}", hint=hint)

    plans, skipped = [], []
    for name in names:
        info = base.info(name)
        label = not_a_weight(base, name)
        if label:
            skipped.append(_skip(name, SkipCategory.not_weight, f"{label}, not a weight", label))
            continue
        kk = None
        if want == Want.matrices:
            why = _not_matrix(name, info)
            if why:
                skipped.append(why)
                continue
            shape = info.shape[-2:]
            kk = k if k is not None else default_k(shape) if default_k else None
            need = max(kk or 1, min_side)
            if min(shape) < need:
                asked = f"k={kk}" if kk is not None and kk >= min_side else f"{min_side}"
                skipped.append(_skip(name, SkipCategory.small, f"shape {info.shape}: smaller side {min(shape)} < {asked}",
                                     f"smaller than {asked}"))
                continue
        sides, left_out = [], []
        for i, (run, keys) in enumerate(zip(runs, run_keys)):
            what = f"run {i} ({run.ref})" if partial else run.ref
            if name not in keys:
                missing = f"missing in {what}" if partial else f"only in base (missing in {what})"
                left_out.append(_skip(name, SkipCategory.missing, missing,
                                      "in one checkpoint only"))
                continue
            other = run.info(name)
            if other.shape != info.shape:
                left_out.append(_skip(name, SkipCategory.shape, f"shape {info.shape} in base vs {other.shape} in {what}",
                                      "shape differs"))
                continue
            if not_a_weight(run, name):
                left_out.append(_skip(name, SkipCategory.not_weight, f"{other.dtype} in {what}, not a weight",
                                      f"{other.dtype} in a run"))
                continue
            m = None
            if compare:
                m = mode or default_mode(info.dtype, other.dtype)
                if m == CompareMode.bitwise and info.dtype != other.dtype:
                    raise UsageError(f"{name}: bitwise comparison needs one dtype, base has {info.dtype}, "
                                     f"{run.ref} has {other.dtype}", hint="use --mode bf16 or --mode eta")
            sides.append(Side(i, run, other, m))
        if not partial:
            left_out = left_out[:1]  # the tensor is skipped: one reason is enough
        elif left_out:
            left_out = [Skipped(s.name, s.reason + "; run left out of this tensor", s.category, s.kind)
                        for s in left_out]
        skipped += left_out
        if (sides or not runs) and (partial or not left_out):
            plans.append(TensorPlan(name, base, info, tuple(sides), parse_name(name, conv1d), kk))
    seen = set(base.keys())
    for i, (run, keys) in enumerate(zip(runs, run_keys)):
        what = f"run {i} ({run.ref})" if partial else run.ref
        for name in run.keys():
            if name not in seen and selected(name, include, exclude):
                seen.add(name)
                skipped.append(_skip(name, SkipCategory.missing, f"only in {what} (missing in base)",
                                     "in one checkpoint only"))
    return Plan(tuple(plans), tuple(skipped))
