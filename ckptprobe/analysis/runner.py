"""The window runner: per-window numpy work over planned tensors, on the CPUs the process may use.

`run_windows(plans, work, step)` cuts each `TensorPlan` into windows of `step(plan)`
elements, calls `work(plan, start, stop)` on every window and yields, per plan in order,
the list of its windows' results. Analyses that stream their tensors (sparsity, consensus,
drift) are a `work` function plus a reduction of its results; this is also the one place
where another backend (a cluster) would plug in.

The work is many short numpy calls on cache-sized chunks. Threads release the GIL inside
each call but fight over it between calls, so forked worker processes are used when every
source says it can be forked (`forkable`: local files; a forked child must not reuse the
parent's HTTP connections) and the platform can fork; else threads.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TypeVar

from ckptprobe import _threads
from ckptprobe.analysis.plan import TensorPlan
from ckptprobe.errors import InvalidCheckpointError
from ckptprobe.io.sources import TensorSource, locate

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")
SERIAL_BYTES = 96 << 20  # below this much data, starting workers costs more than the work

_JOB: Callable | None = None  # what a forked worker runs: inherited at fork, never pickled
_SCRATCH = threading.local()


def default_workers() -> int:
    """The CPUs this process may use (affinity mask and cgroup quota), whatever the load: see `_threads`."""
    return _threads.usable_cpus()


def buffer(slot: int, nbytes: int) -> mmap.mmap:
    """A writable buffer of at least `nbytes` bytes that this thread keeps for `slot`.

    Work that runs per window (reads with `source.read(..., out=scratch(k, nbytes + READ_SLACK))`,
    masks, counters, the compiled loops' read buffers) uses the same few buffers from call to
    call: they stay in cache, and no fresh memory is faulted in per window. What a slot held is
    gone at its next use. An anonymous map: page-aligned, and no numpy needed to make one.
    """
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(slot)
    if buf is None or len(buf) < nbytes:
        buf = buffers[slot] = mmap.mmap(-1, max(nbytes, 1 << 16))
    return buf


def scratch(slot: int, shape: int | tuple[int, ...], dtype="uint8") -> np.ndarray:
    """An uninitialized array of `shape` and `dtype` on `buffer(slot, ...)`."""
    import numpy as np

    dtype = np.dtype(dtype)
    nbytes = math.prod(shape if isinstance(shape, tuple) else (shape,)) * dtype.itemsize
    return np.frombuffer(buffer(slot, nbytes), np.uint8, nbytes).view(dtype).reshape(shape)


@contextlib.contextmanager
def opened(sources: Sequence[TensorSource], name: str, start: int) -> Iterator[list[tuple[int, int]] | None]:
    """For the compiled loops that read files themselves (`count16_files`, `mark16_files`): each source's
    (file descriptor, byte offset of element `start` of tensor `name`), the files open for the block;
    None unless every source holds the tensor in a local safetensors file. A read error of the loops
    (an OSError whose `filename` is the index of a source) becomes one that names the file."""
    spans = [locate(s, name) for s in sources]
    if None in spans:
        yield None
        return
    fds = []
    try:
        for path, _ in spans:
            fds.append(os.open(path, os.O_RDONLY))
        yield [(fd, offset + start * s.info(name).itemsize) for fd, (_, offset), s in zip(fds, spans, sources)]
    except OSError as e:
        if not isinstance(e.filename, int):
            raise
        why = "file shrank while being read" if e.errno == getattr(errno, "ENODATA", None) else \
            f"cannot read ({e.strerror})"
        raise InvalidCheckpointError(f"{spans[e.filename][0]}: tensor {name!r}: {why}") from None
    finally:
        for fd in fds:
            os.close(fd)


def forkable(plans: Sequence[TensorPlan]) -> bool:
    """Whether every source of `plans` may be used from a forked child."""
    return all(getattr(s, "forkable", False) for p in plans for s in (p.base, *(r.source for r in p.runs)))


def _run(task):
    return _JOB(*task)


def parallel_map(fn: Callable, tasks: Sequence, workers: int, fork: bool) -> Iterator:
    """`fn(*task)` for each task, results in order, on `workers` forked processes (`fork`) or threads.

    With `fork`, `fn` may be any callable (a closure over open sources): workers inherit it;
    tasks and results travel pickled, so keep them small (indices in, counts out).
    """
    global _JOB
    workers = min(workers, len(tasks))
    if workers <= 1:
        yield from (fn(*t) for t in tasks)
        return
    import multiprocessing  # here, not at the top: ~25 ms that a run on one worker does without
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if fork and "fork" in multiprocessing.get_all_start_methods():
        _JOB = fn
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                yield from pool.map(_run, tasks, chunksize=max(1, len(tasks) // (8 * workers)))
        finally:
            _JOB = None
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(lambda t: fn(*t), tasks)


def run_windows(plans: Sequence[TensorPlan], work: Callable[[TensorPlan, int, int], T],
                step: Callable[[TensorPlan], int], workers: int | None = None,
                progress: Callable[[int], None] | None = None) -> Iterator[tuple[TensorPlan, list[T]]]:
    """Yield `(plan, [work(plan, start, stop) for each window])` per plan, in the order of `plans`.

    Windows are flat element ranges `[start, stop)` of `step(plan)` elements (the last may be
    shorter); a tensor without elements gets one empty window (0, 0), so every plan gets results.
    `workers` None: `default_workers()`, or one for less than SERIAL_BYTES of data. `progress`, if
    given, is called with the bytes a window read (base and runs) as each result arrives.
    """
    if workers is None:
        small = sum(p.info.nbytes + sum(r.info.nbytes for r in p.runs) for p in plans) < SERIAL_BYTES
        workers = 1 if small else default_workers()
    tasks = []  # (plan index, start, stop): small, since forked workers get them pickled
    for i, p in enumerate(plans):
        n, s = p.info.numel, max(1, step(p))
        tasks += [(i, lo, min(lo + s, n)) for lo in range(0, n, s)] or [(i, 0, 0)]

    def job(i: int, start: int, stop: int):
        return work(plans[i], start, stop)

    current, results = None, []
    try:
        for (i, start, stop), r in zip(tasks, parallel_map(job, tasks, workers, forkable(plans))):
            if progress:
                p = plans[i]
                progress((stop - start) * (p.info.itemsize + sum(s.info.itemsize for s in p.runs)))
            if i != current:
                if current is not None:
                    yield plans[current], results
                current, results = i, []
            results.append(r)
        if current is not None:
            yield plans[current], results
    finally:
        _SCRATCH.__dict__.pop("buffers", None)  # a run on this thread (one worker) keeps no buffer
