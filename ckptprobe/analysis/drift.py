"""Drift over a checkpoint series: how far each module group has moved, and lm_head surges.

For checkpoints W_1..W_T of one run (in training order) and their base W_0, per tensor
and summed per module group (attention / mlp / embedding / head / norm / other):

- `rel_to_base[t] = ||W_t - W_0||_F / ||W_0||_F`: cumulative drift;
- `rel_step[t]    = ||W_t - W_{t-1}||_F / ||W_{t-1}||_F`: the step between consecutive checkpoints.

Group values pool the squared norms of the group's tensors (a group is one big vector),
so large matrices weigh by their size. Norms are accumulated in float64.

lm_head surge: "When to Stop Reusing" (Sec. 5) finds the lm_head's update energy
surging before policy collapse. Across checkpoints we track the head's step relative to
the body's, `r_t = rel_step(head) / rel_step(attention + mlp)`, so that checkpoints saved
at uneven intervals (a longer step moves everything more) raise no alarm, and flag step
t when it is an outlier against its own history: `z_t = (r_t - mean(r_<t)) /
(std(r_<t) + 1e-12) > z_threshold`, once at least `min_history` earlier steps exist.
The head is `lm_head`; with tied embeddings (no lm_head tensor) the embedding matrix.
Without attention/mlp tensors (an --include that selects only the head) r_t is the
head's own `rel_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ckptprobe.analysis.plan import Skipped, TensorPlan, Want, plan_tensors
from ckptprobe.analysis.runner import run_windows
from ckptprobe.analysis.weights import read_values
from ckptprobe.errors import UsageError
from ckptprobe.io.sources import TensorSource

WINDOW = 4 << 20  # elements per read; memory holds ~3 windows of float64 per worker


@dataclass(frozen=True)
class TensorDrift:
    name: str
    group: str
    module: str
    layer: int | None
    base_norm: float
    rel_to_base: tuple[float, ...]  # one per checkpoint
    rel_step: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "group": self.group, "module": self.module, "layer": self.layer,
                "base_norm": self.base_norm, "rel_to_base": list(self.rel_to_base), "rel_step": list(self.rel_step)}


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
    groups: dict  # group -> {"rel_to_base": [...], "rel_step": [...]}
    head: str | None  # name of the tensor watched for surges
    surges: tuple[Surge, ...]
    z_threshold: float
    skipped: tuple[Skipped, ...]

    def to_dict(self) -> dict:
        return {"command": "drift", "base": self.base, "checkpoints": list(self.checkpoints),
                "groups": self.groups, "head": self.head, "z_threshold": self.z_threshold,
                "surges": [s.to_dict() for s in self.surges],
                "tensors": [t.to_dict() for t in self.tensors], "skipped": [s.to_dict() for s in self.skipped]}


def _sq_norms(plan: TensorPlan, start: int, stop: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Squared norms over elements [start, stop) of one tensor: ||W0||^2, ||W_t - W0||^2,
    ||W_t - W_{t-1}||^2, ||W_{t-1}||^2 (t = 1..T), in float64."""
    T = len(plan.runs)
    to_base, step, prev_sq = np.zeros(T), np.zeros(T), np.zeros(T)
    w0 = read_values(plan.base, plan.name, start, stop).astype(np.float64)
    w0_sq = float(w0 @ w0)
    prev = w0
    for t, r in enumerate(plan.runs):
        wt = read_values(r.source, plan.name, start, stop).astype(np.float64)
        d0, d1 = wt - w0, wt - prev
        to_base[t] = d0 @ d0
        step[t] = d1 @ d1
        prev_sq[t] = prev @ prev
        prev = wt
    return w0_sq, to_base, step, prev_sq


def _ratio(num: np.ndarray, den: np.ndarray | float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(num) / np.sqrt(den)


def surges(ratio: Sequence[float], names: Sequence[str], z_threshold: float, min_history: int = 3) -> list[Surge]:
    """Steps whose `ratio` is a z-score outlier (> z_threshold) against all earlier steps."""
    out = []
    for t in range(min_history, len(ratio)):
        hist = np.asarray(ratio[:t], dtype=np.float64)
        z = (ratio[t] - hist.mean()) / (hist.std() + 1e-12)
        if z > z_threshold:
            out.append(Surge(names[t], t, float(ratio[t]), float(z)))
    return out


def drift(base: TensorSource, series: Sequence[TensorSource], include: Sequence[str] = (),
          exclude: Sequence[str] = (), z_threshold: float = 3.0,
          progress: Callable[[int], None] | None = None, workers: int | None = None) -> DriftResult:
    """Per-tensor and per-group drift of `series` (checkpoints in training order) from `base`."""
    if not series:
        raise UsageError("drift needs at least one checkpoint after the base")
    plan = plan_tensors(base, series, Want.floating, include, exclude)
    tensors, pooled = [], {}
    for p, windows in run_windows(plan.tensors, _sq_norms, lambda p: WINDOW, workers, progress):
        w0_sq, to_base, step, prev_sq = (sum(w[i] for w in windows) for i in range(4))
        tensors.append(TensorDrift(p.name, p.group, p.module, p.layer, math.sqrt(w0_sq),
                                   tuple(_ratio(to_base, w0_sq).tolist()), tuple(_ratio(step, prev_sq).tolist())))
        acc = pooled.setdefault(p.group, [0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate((w0_sq, to_base, step, prev_sq)):
            acc[i] = acc[i] + v
    groups = {g: {"rel_to_base": _ratio(a[1], a[0]).tolist(), "rel_step": _ratio(a[2], a[3]).tolist()}
              for g, a in pooled.items()}
    by_name = {t.name: t for t in tensors}
    head = next((t.name for t in tensors if t.module == "lm_head"), None) or \
        next((t.name for t in tensors if t.module == "embed"), None)
    body = [pooled[g] for g in ("attention", "mlp") if g in pooled]
    ratio = np.asarray(by_name[head].rel_step) if head else None
    if head and body:
        with np.errstate(divide="ignore", invalid="ignore"):  # a body that did not move: no ratio (NaN)
            ratio = ratio / _ratio(sum(a[2] for a in body), sum(a[3] for a in body))
    found = surges(ratio.tolist(), [s.ref for s in series], z_threshold) if head else []
    return DriftResult(base.ref, tuple(s.ref for s in series), tuple(tensors), groups, head, tuple(found),
                       z_threshold, plan.skipped)
