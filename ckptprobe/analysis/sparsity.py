"""Update sparsity: the fraction of weights a fine-tune left unchanged.

Per tensor, then summed per module type, per layer and in total. Tensors are read in
windows of `WINDOW` elements from both checkpoints at once, so memory stays at a few
windows whatever the model size; windows are counted on every core (`parallel_map`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from ckptprobe.analysis._parallel import parallel_map
from ckptprobe.analysis.pairing import Skipped, pair_tensors
from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA, CompareMode, count_changes, default_mode
from ckptprobe.errors import UsageError
from ckptprobe.io.names import MODULE_ORDER, parse_name
from ckptprobe.io.sources import MultiFileSource, TensorSource

WINDOW = 8 << 20  # elements per read: 16 MiB of bf16 per side


@dataclass(frozen=True)
class Counts:
    """Entries compared, changed, and non-finite (NaN/inf on either side, neither changed nor unchanged)."""

    numel: int
    changed: int
    nonfinite: int = 0

    @property
    def sparsity(self) -> float | None:
        """Unchanged / finite entries; None when there is no finite entry."""
        finite = self.numel - self.nonfinite
        return (finite - self.changed) / finite if finite else None

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.numel + other.numel, self.changed + other.changed, self.nonfinite + other.nonfinite)

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity}


@dataclass(frozen=True)
class TensorSparsity:
    name: str
    layer: int | None
    module: str
    group: str
    shape: tuple[int, ...]
    dtype: str
    ft_dtype: str
    mode: str
    counts: Counts

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "counts"}
        return {**d, "shape": list(self.shape), **self.counts.to_dict()}


@dataclass(frozen=True)
class SparsityResult:
    base: str
    finetuned: str
    mode: str  # the mode asked for, or "auto"
    eta: float
    atol: float
    tensors: tuple[TensorSparsity, ...]
    skipped: tuple[Skipped, ...]

    def by(self, key: str) -> dict:
        """Counts summed per "module", "layer" or "group", in a stable order (layers ascending, None last)."""
        out: dict = {}
        for t in self.tensors:
            k = getattr(t, key)
            out[k] = out.get(k, Counts(0, 0)) + t.counts
        if key == "module":
            order = {m: i for i, m in enumerate(MODULE_ORDER)}
            return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
        if key == "layer":
            return dict(sorted(out.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
        return out

    @property
    def total(self) -> Counts:
        return sum((t.counts for t in self.tensors), Counts(0, 0))

    def to_dict(self) -> dict:
        return {
            "command": "sparsity", "base": self.base, "finetuned": self.finetuned, "mode": self.mode,
            "eta": self.eta, "atol": self.atol,
            "tensors": [t.to_dict() for t in self.tensors],
            "groups": {key: [{key: k, **c.to_dict()} for k, c in self.by(key).items()]
                       for key in ("module", "layer", "group")},
            "total": self.total.to_dict(),
            "skipped": [s.to_dict() for s in self.skipped],
        }


def sparsity(base: TensorSource, finetuned: TensorSource, mode: CompareMode | None = None,
             eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL, include: Sequence[str] = (),
             exclude: Sequence[str] = (), progress: Callable[[int], None] | None = None,
             workers: int | None = None) -> SparsityResult:
    """Compare `finetuned` against `base`, tensor by tensor.

    `mode=None` compares bitwise where both sides share a dtype and after rounding to
    bf16 where they do not. `progress`, if given, is called with the number of bytes
    read after each window.
    """
    names, skipped = pair_tensors(base, [finetuned], include, exclude)
    plan = []
    for name in names:
        a, b = base.info(name), finetuned.info(name)
        m = mode or default_mode(a.dtype, b.dtype)
        if m == CompareMode.bitwise and a.dtype != b.dtype:
            raise UsageError(f"{name}: bitwise comparison needs one dtype, base has {a.dtype}, "
                             f"{finetuned.ref} has {b.dtype}", hint="use --mode bf16 or --mode eta")
        plan.append((name, a, b, m))

    def count(task: tuple[int, int]) -> tuple[int, int]:
        name, a, b, m = plan[task[0]]
        start, stop = task[1], min(task[1] + WINDOW, a.numel)
        return count_changes(base.read(name, start, stop), finetuned.read(name, start, stop),
                             a.dtype, b.dtype, m, eta, atol)

    tasks = [(i, start) for i, p in enumerate(plan) for start in range(0, max(p[1].numel, 1), WINDOW)]
    local = all(isinstance(s, MultiFileSource) for s in (base, finetuned))
    if workers is None and sum(p[1].numel for p in plan) < WINDOW:
        workers = 1  # starting workers costs more than comparing a small model
    per_name: dict[str, Counts] = {}
    for (i, start), (changed, nonfinite) in zip(tasks, parallel_map(count, tasks, workers, fork=local)):
        name, a, b, _ = plan[i]
        n = min(WINDOW, a.numel - start)
        per_name[name] = per_name.get(name, Counts(0, 0)) + Counts(n, changed, nonfinite)
        if progress:
            progress(n * (a.itemsize + b.itemsize))
    tensors = []
    for name, a, b, m in plan:
        p = parse_name(name)
        tensors.append(TensorSparsity(name, p.layer, p.module, p.group, a.shape, a.dtype, b.dtype, m.value,
                                      per_name[name]))
    return SparsityResult(base.ref, finetuned.ref, mode.value if mode else "auto", eta, atol,
                          tuple(tensors), tuple(skipped))
