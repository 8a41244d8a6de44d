"""Update sparsity: the fraction of weights a fine-tune left unchanged.

Per tensor, then summed per module type, per layer and in total. Tensors are cut in
windows of `WINDOW` elements, counted on every core (`run_windows`). A window of local
files is read from both checkpoints `READ` bytes at a time into the same two buffers,
so the count that follows (`update.count_changes`) finds it in cache; a bitwise 16-bit
pair takes one compiled loop that reads and counts `LOOP_READ` bytes a side at a time
(`count16_files`), whatever the window's size. A run whose pairs all take that loop never
imports numpy (~0.1 s of start-up, a sixth of a whole run on a 1.5B pair). Private memory
stays at a few megabytes per worker whatever the model size (a Hub window is fetched whole,
one request per side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ckptprobe.analysis import kernels
from ckptprobe.analysis.choices import DEFAULT_ATOL, DEFAULT_ETA, CompareMode, same_rule
from ckptprobe.analysis.grouping import KEYS, grouped
from ckptprobe.analysis.plan import Skipped, TensorPlan, Want, plan_tensors
from ckptprobe.analysis.runner import buffer, forkable, opened, run_windows, scratch
from ckptprobe.io.sources import READ_SLACK, SMALL_READ, TensorSource

WINDOW = 8 << 20  # elements per task of a worker
READ = 1 << 20  # bytes per side per read: small enough to stay in cache for the count that follows
LOOP_READ = 256 << 10  # the same when the compiled loop reads the files: no call per read, so less


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
        return {"numel": self.numel, "changed": self.changed, "nonfinite": self.nonfinite, "sparsity": self.sparsity}


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
        return {"name": self.name, "layer": self.layer, "module": self.module, "group": self.group,
                "shape": list(self.shape), "dtype": self.dtype, "ft_dtype": self.ft_dtype, "mode": self.mode,
                **self.counts.to_dict()}


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
        """Counts summed per "module", "layer" or "group", in the order of `grouping.order`."""
        return {k: sum((t.counts for t in ts), Counts(0, 0)) for k, ts in grouped(self.tensors, key).items()}

    def rows(self, by: str = "tensor") -> list[dict]:
        """Flat records: one per tensor (`by="tensor"`) or per module, layer or group."""
        if by == "tensor":
            return [t.to_dict() for t in self.tensors]
        return [{by: k, **c.to_dict()} for k, c in self.by(by).items()]

    @property
    def total(self) -> Counts:
        return sum((t.counts for t in self.tensors), Counts(0, 0))

    def to_dict(self) -> dict:
        return {
            "command": "sparsity", "base": self.base, "finetuned": self.finetuned, "mode": self.mode,
            "eta": self.eta, "atol": self.atol,
            "tensors": [t.to_dict() for t in self.tensors],
            "groups": {key: self.rows(key) for key in KEYS},
            "total": self.total.to_dict(),
            "skipped": [s.to_dict() for s in self.skipped],
        }


def sparsity(base: TensorSource, finetuned: TensorSource, mode: CompareMode | None = None,
             eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL, include: Sequence[str] = (),
             exclude: Sequence[str] = (), progress: Callable[[int], None] | None = None,
             workers: int | None = None) -> SparsityResult:
    """Compare `finetuned` against `base`, weight by weight (every floating-point tensor).

    `mode=None` compares bitwise where both sides share a dtype and after rounding to
    bf16 where they do not. `progress`, if given, is called with the number of bytes
    read after each window. `workers` None: the CPUs the process may use (`runner.default_workers`).
    """
    plan = plan_tensors(base, [finetuned], Want.floating, include, exclude, compare=True, mode=mode)

    local = forkable(plan.tensors)  # local files, read into buffers; the Hub: one request per window and side
    count_files = getattr(kernels.compiled, "count16_files", None) if local else None

    def looped(p: TensorPlan) -> bool:
        """Whether `count16_files` reads and counts this pair: then numpy is not needed for it."""
        dtype_b = p.runs[0].info.dtype
        return count_files is not None and kernels.one_pass(p.info.dtype, dtype_b,
                                                            same_rule(p.info.dtype, dtype_b, p.runs[0].mode, eta))

    if not all(looped(p) for p in plan.tensors):  # numpy (~0.1 s): imported once here, not in each forked worker
        import ckptprobe.analysis.update  # noqa: F401

    def count(p: TensorPlan, start: int, stop: int) -> tuple[int, int]:
        ft = p.runs[0]
        if looped(p):
            with opened([base, finetuned], p.name, start) as files:
                if files is not None:  # read and counted in one compiled loop
                    return count_files(files, stop - start, kernels.EXPONENT16[p.info.dtype],
                                       buffer(0, 2 * (LOOP_READ + READ_SLACK)))
        from ckptprobe.analysis.update import count_changes

        if not local or (stop - start) * p.info.itemsize <= SMALL_READ:  # a small window: one read a side
            return count_changes(base.read(p.name, start, stop), finetuned.read(p.name, start, stop),
                                 p.info.dtype, ft.info.dtype, ft.mode, eta, atol)
        step = READ // max(p.info.itemsize, ft.info.itemsize)
        changed = nonfinite = 0
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            c, n = count_changes(base.read(p.name, lo, hi, scratch(0, READ + READ_SLACK)),
                                 finetuned.read(p.name, lo, hi, scratch(1, READ + READ_SLACK)),
                                 p.info.dtype, ft.info.dtype, ft.mode, eta, atol)
            changed, nonfinite = changed + c, nonfinite + n
        return changed, nonfinite

    tensors = []
    for p, windows in run_windows(plan.tensors, count, lambda p: WINDOW, workers, progress):
        ft = p.runs[0]
        counts = Counts(p.info.numel, sum(c for c, _ in windows), sum(n for _, n in windows))
        tensors.append(TensorSparsity(p.name, p.layer, p.module, p.group, p.info.shape, p.info.dtype,
                                      ft.info.dtype, ft.mode.value, counts))
    return SparsityResult(base.ref, finetuned.ref, mode.value if mode else "auto", eta, atol,
                          tuple(tensors), plan.skipped)
