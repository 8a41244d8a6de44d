"""Drift over a checkpoint series: how far each tensor, module, layer and group has moved, and lm_head surges.

For checkpoints W_1..W_T of one run (in training order) and their base W_0, per tensor
and pooled per module, layer or group:

- `rel_to_base[t] = ||W_t - W_0||_F / ||W_0||_F`: cumulative drift;
- `rel_step[t]    = ||W_t - W_{t-1}||_F / ||W_{t-1}||_F`: the step between consecutive checkpoints.

A relative change is undefined when its reference W is zero, and meaningless when W is zero
at the resolution of its dtype (gpt-oss stores zero-initialised expert bias stacks; a
reference of a few subnormals would give ratios of 1e37). So a reference counts as zero,
and the ratio is undefined (NaN: null in JSON, an empty CSV cell, "-" in tables), when its
root-mean-square is below the smallest normal number of its dtype:
`||W||_F^2 <= numel * tiny^2` (tiny: 2^-126 for bf16/fp32, 2^-14 for fp16, 2^-6 for
unscaled fp8 e4m3; block-scaled fp8 values are dequantized to fp32, so fp32's). The
distances themselves (`to_base`, `step`) are always given.

Groups pool sums of squares: a group is one vector, `||dW_group|| = sqrt(sum ||dW_i||^2)`,
so large matrices weigh by their size, and a zero tensor adds its change to the numerator
and nothing to the denominator: it does not make its group undefined. A group's ratio is
undefined only when the whole group is zero (its pooled squared norm at or below the sum of
its tensors' floors). Norms are accumulated in float64.

lm_head surge: "When to Stop Reusing" (Sec. 5) finds the lm_head's update energy
surging before policy collapse. Across checkpoints we track the head's step relative to
the body's, `r_t = rel_step(head) / rel_step(attention + mlp)`, so that checkpoints saved
at uneven intervals (a longer step moves everything more) raise no alarm, and flag step
t when it is an outlier against its own history: `z_t = (r_t - mean(r_<t)) /
(std(r_<t) + 1e-12) > z_threshold`, once at least `min_history` earlier defined steps exist
(undefined steps, NaN or inf, are left out of the history and are never flagged).
The head is `lm_head`; with tied embeddings (no lm_head tensor) the embedding matrix.
Without attention/mlp tensors (an --include that selects only the head) r_t is the
head's own `rel_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from ckptprobe.analysis import kernels
from ckptprobe.analysis.grouping import KEYS, grouped
from ckptprobe.analysis.plan import Skipped, TensorPlan, Want, plan_tensors
from ckptprobe.analysis.runner import buffer, opened, run_windows, scratch
from ckptprobe.analysis.weights import read_values
from ckptprobe.errors import UsageError
from ckptprobe.io import fp8
from ckptprobe.io.sources import READ_SLACK, TensorSource

WINDOW = 4 << 20  # elements per task of a worker
CHUNK = 1 << 16  # elements per step inside a window: a few float64 arrays of 512 KiB, in cache
LOOP_CHUNK = 1 << 15  # the same for the compiled loop: three float32 chunks and one read, 512 KiB
KINDS = {"BF16": "b", "F16": "e", "F32": "f"}  # the dtypes `norms_files` reads, as it names them
# the smallest normal number of each stored float dtype: a tensor whose RMS is below it is zero at its resolution
TINY = {"F64": 2.0 ** -1022, "F32": 2.0 ** -126, "BF16": 2.0 ** -126, "F16": 2.0 ** -14,
        "F8_E4M3": 2.0 ** -6, "F8_E5M2": 2.0 ** -14}


def zero_floor(source: TensorSource, name: str) -> float:
    """The squared Frobenius norm at or below which tensor `name` of `source` counts as zero:
    numel * tiny^2, tiny the smallest normal number of the dtype its values are read in."""
    info = source.info(name)
    dtype = "F32" if fp8.block_scaled(source, name) else info.dtype
    return info.numel * TINY[dtype] ** 2


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class Norms:
    """Squared Frobenius norms of one tensor over a series, or their sums over a group of tensors (float64).

    `sq` (T+1,): ||W_t||^2 for t = 0 (the base) .. T; `floor` (T+1,): the squared norm at or below which
    W_t counts as zero (`zero_floor`, summed over a group); `to_base` (T,): ||W_t - W_0||^2 and
    `step` (T,): ||W_t - W_{t-1}||^2 for t = 1..T.
    """

    numel: int
    sq: np.ndarray
    floor: np.ndarray
    to_base: np.ndarray
    step: np.ndarray

    def __add__(self, other: "Norms") -> "Norms":
        return Norms(self.numel + other.numel, self.sq + other.sq, self.floor + other.floor,
                     self.to_base + other.to_base, self.step + other.step)

    @property
    def zero(self) -> np.ndarray:
        """(T+1,) bool: W_t is zero at its dtype's resolution (no relative change against it)."""
        return self.sq <= self.floor

    @property
    def rel_to_base(self) -> np.ndarray:
        """(T,) ||W_t - W_0|| / ||W_0||; NaN when W_0 is zero."""
        return np.sqrt(self.to_base) / np.sqrt(self.sq[0]) if not self.zero[0] else np.full(len(self.to_base), np.nan)

    @property
    def rel_step(self) -> np.ndarray:
        """(T,) ||W_t - W_{t-1}|| / ||W_{t-1}||; NaN where W_{t-1} is zero."""
        ref = self.sq[:-1]
        return np.where(self.zero[:-1], np.nan, np.sqrt(self.step) / np.sqrt(np.where(self.zero[:-1], 1.0, ref)))

    def rows(self, checkpoints: Sequence[str]) -> list[dict]:
        """One record per checkpoint: the numel, the norms (not squared) and both ratios."""
        norm, rb, rs = np.sqrt(self.sq), self.rel_to_base, self.rel_step
        return [{"checkpoint": c, "numel": self.numel, "base_norm": float(norm[0]), "norm": float(norm[t + 1]),
                 "to_base": float(np.sqrt(self.to_base[t])), "rel_to_base": float(rb[t]),
                 "step": float(np.sqrt(self.step[t])), "rel_step": float(rs[t])} for t, c in enumerate(checkpoints)]


def _empty(T: int) -> Norms:
    return Norms(0, np.zeros(T + 1), np.zeros(T + 1), np.zeros(T), np.zeros(T))


@dataclass(frozen=True)
class TensorDrift:
    name: str
    group: str
    module: str
    layer: int | None
    norms: Norms

    @property
    def base_norm(self) -> float:
        return float(np.sqrt(self.norms.sq[0]))

    @property
    def rel_to_base(self) -> tuple[float, ...]:
        return tuple(self.norms.rel_to_base.tolist())

    @property
    def rel_step(self) -> tuple[float, ...]:
        return tuple(self.norms.rel_step.tolist())

    def to_dict(self) -> dict:
        n = self.norms
        return {"name": self.name, "group": self.group, "module": self.module, "layer": self.layer,
                "numel": n.numel, "base_norm": self.base_norm, "norm": np.sqrt(n.sq[1:]).tolist(),
                "to_base": np.sqrt(n.to_base).tolist(), "rel_to_base": list(self.rel_to_base),
                "step": np.sqrt(n.step).tolist(), "rel_step": list(self.rel_step)}


@dataclass(frozen=True)
class Surge:
    checkpoint: str
    index: int
    ratio: float  # the head's rel_step over the body's at this step
    z: float

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "index": self.index, "ratio": self.ratio, "z": self.z}


@dataclass(frozen=True)
class DriftResult:
    base: str
    checkpoints: tuple[str, ...]
    tensors: tuple[TensorDrift, ...]
    head: str | None  # name of the tensor watched for surges
    surges: tuple[Surge, ...]
    z_threshold: float
    skipped: tuple[Skipped, ...]

    def by(self, key: str) -> dict[object, Norms]:
        """Squared norms summed per "module", "layer" or "group", in the order of `grouping.order`."""
        T = len(self.checkpoints)
        return {k: sum((t.norms for t in ts), _empty(T)) for k, ts in grouped(self.tensors, key).items()}

    @property
    def nonfinite(self) -> tuple[str, ...]:
        """The tensors holding NaN or inf in the base or a checkpoint: their norms are NaN or inf, and so
        are the pooled norms and ratios of every group, layer or module type they are in."""
        return tuple(t.name for t in self.tensors if not np.isfinite(t.norms.sq).all())

    @property
    def total(self) -> Norms:
        """Squared norms summed over every tensor: the whole model as one vector."""
        return sum((t.norms for t in self.tensors), _empty(len(self.checkpoints)))

    def rows(self, by: str = "tensor") -> list[dict]:
        """Flat records, one per tensor (or module, layer, group) and checkpoint, checkpoints innermost.

        Columns: numel; base_norm ||W_0||, norm ||W_t||, to_base ||W_t - W_0||, step ||W_t - W_{t-1}||
        (a group's: the square root of its tensors' summed squares); rel_to_base = to_base / base_norm and
        rel_step = step / ||W_{t-1}|| (NaN where the reference is zero, see the module docstring).
        """
        if by == "tensor":
            return [{"name": t.name, "module": t.module, "layer": t.layer, "group": t.group, **r}
                    for t in self.tensors for r in t.norms.rows(self.checkpoints)]
        return [{by: k, **r} for k, n in self.by(by).items() for r in n.rows(self.checkpoints)]

    def to_dict(self) -> dict:
        return {"command": "drift", "base": self.base, "checkpoints": list(self.checkpoints),
                "head": self.head, "z_threshold": self.z_threshold, "nonfinite": list(self.nonfinite),
                "surges": [s.to_dict() for s in self.surges],
                "total": self.total.rows(self.checkpoints),
                "groups": {key: self.rows(key) for key in KEYS},
                "tensors": [t.to_dict() for t in self.tensors], "skipped": [s.to_dict() for s in self.skipped]}


def _dot(x: np.ndarray) -> float:
    """x . x in numpy's own loop: BLAS's `@` starts its threads for every chunk, and beside the
    other window workers those threads made a run 3x slower than one worker alone."""
    return float(np.einsum("i,i->", x, x))


def _sq_norms(plan: TensorPlan, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Squared norms over elements [start, stop) of one tensor, float64: ||W_t||^2 (t = 0..T),
    ||W_t - W0||^2 and ||W_t - W_{t-1}||^2 (t = 1..T). Summed CHUNK elements at a time, so that
    every float64 array stays in cache and no fresh memory is faulted in per window; local
    bf16, fp16 and float32 files take one compiled loop (`norms_files`) that reads them itself."""
    T = len(plan.runs)
    sources = (plan.base, *(r.source for r in plan.runs))
    kinds = "".join(KINDS.get(s.info(plan.name).dtype, "?") for s in sources)
    norms_files = getattr(kernels.compiled, "norms_files", None)
    if norms_files is not None and "?" not in kinds:  # FP8 (block-scaled or not) and float64 have no kind
        with opened(sources, plan.name, start) as files:
            if files is not None:
                out = np.empty(3 * T + 1)
                norms_files(files, kinds, stop - start, buffer(0, 16 * LOOP_CHUNK + 64 + READ_SLACK), out)
                return out[:T + 1], out[T + 1:2 * T + 1], out[2 * T + 1:]
    sq, to_base, step = np.zeros(T + 1), np.zeros(T), np.zeros(T)
    size = max(s.info(plan.name).itemsize for s in sources)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN: `DriftResult.nonfinite` names the tensor
        for lo in range(start, stop, CHUNK):
            hi = min(lo + CHUNK, stop)
            w0 = read_values(plan.base, plan.name, lo, hi, scratch(0, CHUNK * size + READ_SLACK)).astype(np.float64)
            sq[0] += _dot(w0)
            prev, d = w0, np.empty_like(w0)
            for t, r in enumerate(plan.runs):
                wt = read_values(r.source, plan.name, lo, hi, scratch(1, CHUNK * size + READ_SLACK)).astype(np.float64)
                sq[t + 1] += _dot(wt)
                to_base[t] += _dot(np.subtract(wt, w0, out=d))
                step[t] += _dot(np.subtract(wt, prev, out=d))
                prev = wt
    return sq, to_base, step


def surges(ratio: Sequence[float], names: Sequence[str], z_threshold: float, min_history: int = 3) -> list[Surge]:
    """Steps whose `ratio` is a z-score outlier (> z_threshold) against all earlier defined (finite) steps."""
    out = []
    r = np.asarray(ratio, dtype=np.float64)
    for t in range(len(r)):
        hist = r[:t][np.isfinite(r[:t])]
        if len(hist) < min_history or not np.isfinite(r[t]):
            continue
        z = (r[t] - hist.mean()) / (hist.std() + 1e-12)
        if z > z_threshold:
            out.append(Surge(names[t], t, float(r[t]), float(z)))
    return out


def drift(base: TensorSource, series: Sequence[TensorSource], include: Sequence[str] = (),
          exclude: Sequence[str] = (), z_threshold: float = 3.0,
          progress: Callable[[int], None] | None = None, workers: int | None = None) -> DriftResult:
    """Per-tensor drift of `series` (checkpoints in training order) from `base`; `by`/`rows` pool it."""
    if not series:
        raise UsageError("drift needs at least one checkpoint after the base")
    plan = plan_tensors(base, series, Want.floating, include, exclude)
    tensors = []
    for p, windows in run_windows(plan.tensors, _sq_norms, lambda p: WINDOW, workers, progress):
        sq, to_base, step = (sum(w[i] for w in windows) for i in range(3))
        floor = np.array([zero_floor(s, p.name) for s in (p.base, *(r.source for r in p.runs))])
        tensors.append(TensorDrift(p.name, p.group, p.module, p.layer, Norms(p.info.numel, sq, floor, to_base, step)))
    result = DriftResult(base.ref, tuple(s.ref for s in series), tuple(tensors), None, (), z_threshold, plan.skipped)
    head = next((t for t in tensors if t.module == "lm_head"), None) or \
        next((t for t in tensors if t.module == "embed"), None)
    if head is None:
        return result
    groups = result.by("group")
    body = [groups[g] for g in ("attention", "mlp") if g in groups]
    ratio = head.norms.rel_step
    if body:
        with np.errstate(divide="ignore", invalid="ignore"):  # a body that did not move: no ratio (NaN)
            ratio = ratio / sum(body[1:], body[0]).rel_step
    return replace(result, head=head.name, surges=tuple(surges(ratio.tolist(), result.checkpoints, z_threshold)))
