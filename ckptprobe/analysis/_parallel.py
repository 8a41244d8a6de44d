"""Running numpy work over many windows of a checkpoint on every core.

The work is many short numpy calls on L2-sized chunks. Threads release the GIL inside
each call but fight over it between calls: measured here, two threads ran no faster
than one. Forked worker processes share nothing but the read-only page cache, and two
of them halve the time. They are used when the data is local files (a forked child must
not reuse the parent's HTTP connections) and the platform can fork; else threads.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

_JOB: Callable | None = None  # the function a forked worker runs: inherited, never pickled


def _run(task):
    return _JOB(task)


def parallel_map(fn: Callable, tasks: Iterable, workers: int | None = None, fork: bool = True) -> Iterator:
    """`map(fn, tasks)` in order, on `workers` (default: up to 2 CPUs) forked processes or threads.

    With `fork`, `fn` may be any callable (a closure over open sources): workers inherit it;
    tasks and results travel pickled, so keep them small (indices in, counts out).
    """
    global _JOB
    tasks = list(tasks)
    workers = min(workers or min(2, os.cpu_count() or 1), len(tasks))
    if workers <= 1:
        yield from map(fn, tasks)
        return
    if fork and "fork" in multiprocessing.get_all_start_methods():
        _JOB = fn
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                yield from pool.map(_run, tasks, chunksize=max(1, len(tasks) // (8 * workers)))
        finally:
            _JOB = None
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(fn, tasks)
