"""Start-up of `ckptprobe --help` as a user runs it (a fresh process), against the Python interpreter alone.

Also a whole `ckptprobe sparsity` run on a pair of one-tensor files, which is the start-up every
analysis pays before its first byte of weights (interpreter, numpy, option parsing, headers, output).

Runs each command `--repeats` times, alternating them so that a busy moment hits all alike, and prints
the median and best wall time of each and the ratio to the bare interpreter. Target: `ckptprobe --help`
<= 0.3 s on a quiet 2-core machine. The console script (`ckptprobe`) is used when it is installed for this
interpreter, else `python -m ckptprobe`.

    python benchmarks/bench_startup.py [--repeats 21]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ckptprobe.io.writer import write_safetensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    script = Path(sys.executable).parent / "ckptprobe"
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "ckptprobe"]
    if not script.exists() and shutil.which("ckptprobe"):
        print("note: the ckptprobe on PATH belongs to another interpreter; timing python -m ckptprobe")
    tmp = tempfile.TemporaryDirectory(prefix="bench_startup_")
    pair = [str(Path(tmp.name) / f"{n}.safetensors") for n in ("a", "b")]
    for path in pair:
        write_safetensors(path, {"w": ("BF16", np.zeros((64, 64), np.uint16))})
    jobs = {
        "python -c pass (the floor)": [sys.executable, "-c", "pass"],
        "python -c 'import numpy'": [sys.executable, "-c", "import numpy"],
        "python -c 'import typer'": [sys.executable, "-c", "import typer"],
        "ckptprobe --version": [*cli, "--version"],
        "ckptprobe --help": [*cli, "--help"],
        "ckptprobe sparsity --help": [*cli, "sparsity", "--help"],
        "ckptprobe sparsity A B (64x64)": [*cli, "sparsity", *pair],
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    env = {**os.environ, "COLUMNS": "100"}
    for _ in range(args.repeats):
        for name, cmd in jobs.items():
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
            times[name].append(time.perf_counter() - t)
    tmp.cleanup()
    floor = statistics.median(times["python -c pass (the floor)"])
    print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); {args.repeats} runs each")
    print(f"{'command':<32} {'median s':>9} {'best s':>8} {'x floor':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<32} {med:9.3f} {min(ts):8.3f} {med / floor:8.2f}")
    help_median = statistics.median(times["ckptprobe --help"])
    print(f"ckptprobe --help: {help_median:.3f} s median, target <= 0.3 s: {'met' if help_median <= 0.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
