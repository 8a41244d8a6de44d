"""Do two runs from *different* bases change the same coordinates? Their update masks, compared in place.

`consensus` compares runs of one base. The geometry test of "The Path Not Taken"
(Sec. 4.3, Fig. 6) needs two bases: a run M from the base and a run M' from a scrambled
copy of it (same function, other coordinates in some layers). Each mask is taken against
its own base with the bf16-aware update rule, then the two are compared at the same
coordinates (the same tensor name and index):

- overlap `|M n M'| / |M|` beside its chance level, the density of M' (what M' would
  hit if its changes fell anywhere in the tensor);
- Jaccard `|M n M'| / |M u M'|` beside the independent-Bernoulli baseline `pq / (p + q - pq)`.

Groups (a layer, the whole model) pool counts, and pool the chance levels tensor by
tensor as `consensus` does (`sum_t |M_t| q_t / sum_t |M_t|` and `sum_t n_t p_t q_t /
sum_t n_t (p_t + q_t - p_t q_t)`), so two runs that merely favour the same tensors do
not count as agreeing on coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ckptprobe.analysis.plan import Skipped, plan_tensors
from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA, CompareMode, default_mode, update_mask
from ckptprobe.io.names import parse_name
from ckptprobe.io.sources import TensorSource

CHUNK = 1 << 22  # entries read at a time from each of the four checkpoints


@dataclass(frozen=True)
class TensorOverlap:
    """One tensor: `numel` entries, `changed` |M| and `changed_other` |M'|, `inter` |M n M'|."""

    name: str
    layer: int | None
    numel: int
    changed: int
    changed_other: int
    inter: int


@dataclass(frozen=True)
class OverlapGroup:
    """Pooled counts of some tensors and the chance levels of independent masks of their densities."""

    key: object
    numel: int
    changed: int
    changed_other: int
    inter: int
    expected_inter: float  # sum_t n_t p_t q_t
    expected_union: float  # sum_t n_t (p_t + q_t - p_t q_t)

    @property
    def overlap(self) -> float | None:
        """|M n M'| / |M|: the fraction of the reference run's changes the other run also made."""
        return self.inter / self.changed if self.changed else None

    @property
    def chance(self) -> float | None:
        """The overlap of an M' of the same per-tensor densities placed at random (density of M')."""
        return self.expected_inter / self.changed if self.changed else None

    @property
    def jaccard(self) -> float | None:
        union = self.changed + self.changed_other - self.inter
        return self.inter / union if union else None

    @property
    def bernoulli(self) -> float | None:
        return self.expected_inter / self.expected_union if self.expected_union else None

    def to_dict(self, key_name: str = "key") -> dict:
        return {key_name: self.key, "numel": self.numel, "changed": self.changed,
                "changed_other": self.changed_other, "inter": self.inter,
                "density": self.changed / self.numel if self.numel else None,
                "density_other": self.changed_other / self.numel if self.numel else None,
                "overlap": self.overlap, "chance": self.chance, "jaccard": self.jaccard, "bernoulli": self.bernoulli}


def pool(key, tensors: Sequence[TensorOverlap]) -> OverlapGroup:
    e_inter = e_union = 0.0
    for t in tensors:
        if t.numel:
            p, q = t.changed / t.numel, t.changed_other / t.numel
            e_inter += t.numel * p * q
            e_union += t.numel * (p + q - p * q)
    return OverlapGroup(key, sum(t.numel for t in tensors), sum(t.changed for t in tensors),
                        sum(t.changed_other for t in tensors), sum(t.inter for t in tensors), e_inter, e_union)


@dataclass(frozen=True)
class OverlapResult:
    reference: tuple[str, str]  # (base, run) of M
    other: tuple[str, str]  # (base, run) of M'
    tensors: tuple[TensorOverlap, ...]
    skipped: tuple[Skipped, ...]

    @property
    def total(self) -> OverlapGroup:
        return pool("all", self.tensors)

    def by_layer(self) -> dict:
        """OverlapGroup per layer index, ascending (tensors outside layers under None, last)."""
        groups: dict = {}
        for t in self.tensors:
            groups.setdefault(t.layer, []).append(t)
        return {k: pool(k, groups[k]) for k in sorted(groups, key=lambda k: (k is None, k or 0))}

    def to_dict(self) -> dict:
        return {"reference": list(self.reference), "other": list(self.other), **self.total.to_dict(),
                "layers": [g.to_dict("layer") for g in self.by_layer().values()],
                "tensors": [pool(t.name, [t]).to_dict("name") for t in self.tensors],
                "skipped": [s.to_dict() for s in self.skipped]}


def _mask(base: TensorSource, run: TensorSource, name: str, start: int, stop: int, mode: CompareMode | None,
          eta: float, atol: float) -> np.ndarray:
    a, b = base.info(name).dtype, run.info(name).dtype
    changed, _ = update_mask(base.read(name, start, stop), run.read(name, start, stop), a, b,
                             mode or default_mode(a, b), eta, atol)
    return changed


def mask_overlap(base: TensorSource, run: TensorSource, other_base: TensorSource, other_run: TensorSource,
                 mode: CompareMode | None = None, eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL,
                 include: Sequence[str] = (), exclude: Sequence[str] = ()) -> OverlapResult:
    """M = update mask of `run` against `base`, M' = that of `other_run` against `other_base`, compared
    entry by entry in every tensor the four checkpoints hold with one shape.

    `mode=None` compares bitwise where a pair shares a dtype and after rounding to bf16
    where it does not (as `sparsity` and `consensus` do). Non-finite entries count as unchanged.
    """
    plan = plan_tensors(base, [run, other_base, other_run], include=include, exclude=exclude)
    tensors = []
    for name in (t.name for t in plan.tensors):
        n = base.info(name).numel
        changed = changed_other = inter = 0
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            m = _mask(base, run, name, start, stop, mode, eta, atol)
            m2 = _mask(other_base, other_run, name, start, stop, mode, eta, atol)
            changed += int(np.count_nonzero(m))
            changed_other += int(np.count_nonzero(m2))
            inter += int(np.count_nonzero(m & m2))
        tensors.append(TensorOverlap(name, parse_name(name).layer, n, changed, changed_other, inter))
    return OverlapResult((base.ref, run.ref), (other_base.ref, other_run.ref), tuple(tensors), plan.skipped)
