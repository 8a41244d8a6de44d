"""How many threads torch and the BLAS libraries use, and how many worker processes an analysis
starts: chosen here, not left to the libraries' defaults.

The libraries start one thread per core and make the threads meet at the end of every
parallel region. When other processes keep the machine busy, a thread the kernel has
taken off its core stalls the others at each of those barriers: a LAPACK SVD, made of
thousands of small regions, then runs 4-20x slower on two threads than on one. So the
default is the CPUs this process may use that nobody else is running on right now:

    threads = min(CPUs in the affinity mask and cgroup quota, CPUs not busy now, 16)

"Busy now" is the count of runnable tasks the kernel reports (`/proc/loadavg`), other
than this process; at least one thread is always used. The cap of 16 is where a
single LAPACK call on the matrices of a language model stops gaining from more threads;
more cores are better spent on worker processes. A process that forks workers
gives each `threads // workers` threads (at least 1): separate processes do not wait
on each other's barriers. `OMP_NUM_THREADS`, when set, replaces the default, and an
explicit count (`--threads N`) replaces both.

The window runner's worker processes are another matter: they have no barriers, so a
descheduled one delays only its own windows, and their default is every usable CPU
whatever the load (`runner.default_workers`). A count read from the runnable tasks at
start would see a passing task as a busy CPU: on a quiet 2-core machine it halved the workers of
one `sparsity` run in three and made it 1.3 s instead of 0.7 s. On a machine kept busy,
fewer workers can be faster (`--workers 1`: 1.5 s against 1.8-2.3 s on two at load 3.5).

Nothing here imports torch or numpy: the count is applied to the libraries already
loaded and written to `OMP_NUM_THREADS`, `MKL_NUM_THREADS` and `OPENBLAS_NUM_THREADS`,
which those loaded later (and child processes) read when they start.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ckptprobe.errors import UsageError

__all__ = ["configure", "default", "usable_cpus"]

CAP = 16
_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, limited by a cgroup v2 CPU quota if one is set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:  # "max 100000" (no quota) or "<quota> <period>" in microseconds
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _busy_cpus() -> int:
    """Runnable tasks on the machine other than this one, now (0 where the kernel does not say)."""
    try:  # "0.52 0.58 0.59 3/245 1234": the fourth field is runnable/total, this process included
        return max(0, int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return 0


def default() -> int:
    """The thread count used when none is given (see the module docstring)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    idle = (os.cpu_count() or 1) - _busy_cpus()
    return max(1, min(usable_cpus(), idle, CAP))


def configure(threads: int | None = None, workers: int = 1) -> int:
    """Set the threads torch and BLAS use in this process (and in processes started from it).

    `threads` None applies the default; with `workers` forked processes sharing the
    count, each gets `threads // workers` (at least 1). Returns the per-process count set.
    """
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    n = max(1, (threads if threads is not None else default()) // max(1, workers))
    for var in _VARS:
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "numpy" in sys.modules or "scipy" in sys.modules:  # their BLAS is loaded: set it in place
        from threadpoolctl import threadpool_limits

        threadpool_limits(n, user_api="blas")
    return n
