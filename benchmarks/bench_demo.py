"""Benchmark: `ckptprobe demo` as a user runs it (whole process), alone and with one busy process beside it.

`demo` (every analysis on the shipped example family) with the default thread policy against
`--threads N`, N the CPUs usable (what torch and BLAS do when nobody chooses: a thread per core),
first alone, then beside `python -c "while 1: pass"` (one core kept busy); and `python -c "import
torch"`, the floor under any command that needs torch. Targets: <= 3 s on a quiet 2-core machine,
<= 6 s beside one busy process.

Each figure is the median of `--repeats` runs; "cpu" is the user + system time of the command, which
a busy machine inflates far less than wall time. The load average is printed before and after:
on a shared machine, compare the ratios printed by one run.

    python benchmarks/bench_demo.py            # ~1-2 min
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def command() -> list[str]:
    """The console script of this interpreter when installed, else `python -m ckptprobe`."""
    script = Path(sys.executable).parent / "ckptprobe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ckptprobe"]


def run(argv: list[str], repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `argv` over `repeats` runs (output discarded, exit status checked)."""
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    args = parse()
    cpus = len(os.sched_getaffinity(0))
    env_threads = {v: os.environ[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                              "PYTHONDONTWRITEBYTECODE")  # the last: every run compiles again
                   if v in os.environ}
    print(f"{cpus} CPUs usable; load average before: {load()}"
          + (f"; note: {env_threads} set in the environment" if env_threads else ""), flush=True)
    cli = command()
    rows = [("python -c 'import torch'", run([sys.executable, "-c", "import torch"], args.repeats))]
    for busy in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if busy else None
        try:
            where = "beside a busy process" if busy else "alone"
            rows.append((f"demo, default threads, {where}", run(cli + ["demo"], args.repeats)))
            rows.append((f"demo, --threads {cpus}, {where}", run(cli + ["demo", "--threads", str(cpus)], args.repeats)))
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    print(f"\n{'':46} {'wall s':>7} {'cpu s':>7}")
    for name, (wall, cpu) in rows:
        print(f"{name:46} {wall:7.2f} {cpu:7.2f}")
    figures = dict(rows)
    for where in ("alone", "beside a busy process"):
        ours, theirs = figures[f"demo, default threads, {where}"][0], figures[f"demo, --threads {cpus}, {where}"][0]
        print(f"demo {where}: default {ours:.2f} s vs a thread per core {theirs:.2f} s ({theirs / ours:.1f}x)")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
