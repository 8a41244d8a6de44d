"""Speed and memory of `ckptprobe consensus` on R synthetic runs of a Qwen2.5-1.5B-shaped model.

Prints the seconds of the whole process as a user runs it (median of --repeat), the
seconds of reading all R + 1 checkpoints from the page cache with `cat > /dev/null`,
their ratio (the fraction of read throughput consensus reaches; target >= 0.8), and
the peak RSS of the consensus process (target < 2 GB).

The CPU time (user + sys, including ~0.3 s of start-up and imports) is printed too: on a
shared machine it is less disturbed by other processes than the wall time. Then the scan
alone, in this process (no start-up), with the compiled loops and on the numpy path that an
install without a C compiler takes. Last, where the scan's time goes: two forked processes
read the same chunks into buffers only, then also mark the runs' bits (`mark16_files`), then
also tally them (`tally8`), with their user and kernel CPU: the copy that `cat` pays too, and
what each loop adds to it.

    python benchmarks/bench_consensus.py                      # 14 layers, 8 runs (~13.5 GB of files)
    python benchmarks/bench_consensus.py --layers 2 --runs 4 --dir /tmp/cons   # quick; files kept for reuse

It also times the same runs against a copy of the base with one exact zero per 4,096
entries (`base-zeros.safetensors`): the bitwise fast path must not care (the printed
slowdown should be ~1.0x).

    python benchmarks/bench_consensus.py --tiny 30000        # one file of 30,000 tiny tensors instead

`--tiny N` times consensus of two runs against sparsity of one on a base of N tiny (4 x 8)
bf16 tensors (a MoE checkpoint with one tensor per expert has thousands): per-tensor costs,
not throughput. Both write the default table and JSON; the ratio consensus / sparsity is the
figure to watch (consensus compares two runs, and keeps R x R counts per tensor).

The commands run as `python -m ckptprobe` in the current folder, which Python puts first on
the import path: to time another checkout, run from outside any checkout with
`PYTHONPATH=/that/checkout`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def timed(cmd: list[str]) -> tuple[float, int, float]:
    """Run `cmd` with stdout to /dev/null -> (wall seconds, peak RSS in bytes, CPU seconds) of that process."""
    t = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(cmd, stdout=devnull)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # Linux reports KiB


def scan_seconds(base: Path, runs: list[Path], repeat: int, compiled: bool = True) -> float:
    """Median seconds of the `consensus` API in this process (every CPU): the scan without start-up."""
    from ckptprobe import consensus, open_source
    from synth import scan_median

    return scan_median(lambda: consensus(open_source(str(base)), [open_source(str(r)) for r in runs]), repeat,
                       compiled)


STAGES = ("read into buffers only", "+ mark16 (the runs' bits)", "+ tally8 (histogram, row/col sums)")


def stage_seconds(files: list[str], repeat: int) -> list[tuple[float, float, float]]:
    """Where the scan's time goes: per stage of STAGES, (wall, user, sys) seconds (medians of `repeat`) of two
    forked processes taking every other chunk of `mask_scan.LOOP_CHUNK` entries of the bf16 matrices,
    as `consensus` reads them, with no pool, planner or per-window Python around the loops."""
    import mmap

    import numpy as np

    from ckptprobe import open_source
    from ckptprobe.analysis import kernels
    from ckptprobe.analysis.mask_scan import LOOP_CHUNK
    from ckptprobe.io.sources import READ_SLACK

    sources = [open_source(f) for f in files]
    chunks = []  # (byte offset of the chunk's first entry in each file, entries, columns)
    for name in sources[0].keys():
        info = sources[0].info(name)
        if info.dtype == "BF16" and len(info.shape) == 2 and info.numel:
            step = max(1, LOOP_CHUNK // info.shape[1]) * info.shape[1]
            at = [s.locate(name)[1] for s in sources]
            chunks += [([a + 2 * lo for a in at], min(step, info.numel - lo), info.shape[1])
                       for lo in range(0, info.numel, step)]
    most = max(m for _, m, _ in chunks)

    def work(stage: int, mine: list) -> None:
        fds = [os.open(f, os.O_RDONLY) for f in files]
        buf = mmap.mmap(-1, 2 * (2 * most + READ_SLACK))
        codes, counts, hist = np.empty(most, np.uint8), np.empty(most, np.uint8), np.zeros(256, np.int64)
        for at, m, cols in mine:
            if stage == 0:
                for fd, a in zip(fds, at):
                    os.preadv(fd, [memoryview(buf)[:2 * m]], a)
                continue
            kernels.compiled.mark16_files(list(zip(fds, at)), m, 0x7F80, buf, codes[:m])
            if stage == 2:
                kernels.compiled.tally8(codes[:m], cols, hist, counts[:m], np.zeros(m // cols, np.int64),
                                        np.zeros(cols, np.int64))

    out = []
    for stage in range(len(STAGES)):
        runs = []
        for _ in range(repeat):
            t, before = time.perf_counter(), os.times()
            pids = []
            for half in (chunks[0::2], chunks[1::2]):
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        work(stage, half)
                        code = 0
                    finally:
                        os._exit(code)
                pids.append(pid)
            if any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids):
                raise SystemExit(f"a process timing {STAGES[stage]!r} failed")
            after = os.times()
            runs.append((time.perf_counter() - t, after.children_user - before.children_user,
                         after.children_system - before.children_system))
        out.append(tuple(statistics.median(r[i] for r in runs) for i in range(3)))
    return out


def write_tiny(folder: Path, n: int) -> list[str]:
    """A base of `n` tiny (4, 8) bf16 tensors and two runs changing ~30% of the entries each (seeded)."""
    import numpy as np

    from ckptprobe.analysis.bf16 import float32_to_bf16_bits
    from ckptprobe.io.writer import write_safetensors

    rng = np.random.default_rng(0)
    names = [f"model.layers.{i // 100}.mlp.experts.{i % 100}.up_proj.weight" for i in range(n)]
    base = {m: float32_to_bf16_bits(rng.standard_normal((4, 8)).astype(np.float32) * 0.02) for m in names}
    paths = [folder / "base.safetensors", folder / "run0.safetensors", folder / "run1.safetensors"]
    write_safetensors(paths[0], {m: ("BF16", b) for m, b in base.items()})
    for path in paths[1:]:
        write_safetensors(path, {m: ("BF16", np.where(rng.random(b.shape) < 0.3, b + 1, b).astype(np.uint16))
                                 for m, b in base.items()})
    return list(map(str, paths))


def tiny_case(n: int, folder: Path, repeat: int) -> None:
    folder = folder / f"tiny-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    files = [str(folder / f) for f in ("base.safetensors", "run0.safetensors", "run1.safetensors")]
    if not all(Path(f).exists() for f in files):
        files = write_tiny(folder, n)
    ckpt = [sys.executable, "-m", "ckptprobe"]
    load = os.getloadavg()[0]
    print(f"{n:,} tiny (4 x 8) bf16 tensors per file; load average {load:.1f} at start")
    for fmt in ([], ["-f", "json"]):
        cons = statistics.median(timed([*ckpt, "consensus", *files, *fmt])[0] for _ in range(repeat))
        spar = statistics.median(timed([*ckpt, "sparsity", *files[:2], *fmt])[0] for _ in range(repeat))
        what = "json" if fmt else "table"
        print(f"{what:5s}: consensus base run0 run1 {cons:.2f} s, sparsity base run0 {spar:.2f} s, "
              f"ratio {cons / spar:.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=14, help="layers of the synthetic model (14: ~1.5 GB a file)")
    ap.add_argument("--runs", type=int, default=8, help="number of fine-tuned runs R")
    ap.add_argument("--dir", type=Path, help="keep the generated files here and reuse them if present")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiny", type=int, metavar="N", help="instead: a file of N tiny tensors, consensus vs sparsity")
    args = ap.parse_args()

    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.dir = Path(tmp.name)
    if args.tiny:
        tiny_case(args.tiny, args.dir, args.repeat)
        if tmp is not None:
            tmp.cleanup()
        return
    folder = args.dir / f"qwen-{args.layers}l"
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.safetensors"
    runs = [folder / f"run{r}.safetensors" for r in range(args.runs)]
    missing = [p for p in [base, *runs] if not p.exists()]
    if missing:
        print(f"writing {len(missing)} synthetic checkpoint(s) into {folder} ...", file=sys.stderr)
        # In a child process: the memory this takes would otherwise stay in our RSS and be
        # inherited (as ru_maxrss) by every process we start.
        paths = list(map(str, runs))
        code = f"from synth import write_pair; write_pair({str(base)!r}, {paths!r}, layers={args.layers})"
        subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, check=True)
    zeros = folder / "base-zeros.safetensors"
    if not zeros.exists():
        code = ("import numpy as np; from ckptprobe.io.sources import open_source; "
                "from ckptprobe.io.writer import write_safetensors; "
                f"s = open_source({str(base)!r}); t = {{n: ('BF16', s.get_array(n).copy()) for n in s.keys()}}; "
                "[a.reshape(-1).__setitem__(slice(None, None, 4096), 0) for _, a in t.values()]; "
                f"write_safetensors({str(zeros)!r}, t)")
        subprocess.run([sys.executable, "-c", code], check=True)
    files = [str(base), *map(str, runs)]
    size = sum(os.path.getsize(f) for f in files)

    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    load = os.getloadavg()[0]
    read = statistics.median(timed(["cat", *files])[0] for _ in range(args.repeat))
    cmd = [sys.executable, "-m", "ckptprobe", "consensus", *files]
    zero_cmd = [sys.executable, "-m", "ckptprobe", "consensus", str(zeros), *map(str, runs)]
    results, zero_results = [], []
    for _ in range(args.repeat):  # alternating, so that a slower minute of the machine hits both
        results.append(timed(cmd))
        zero_results.append(timed(zero_cmd))
    wall = statistics.median(r[0] for r in results)
    rss = max(r[1] for r in results)
    cpu = statistics.median(r[2] for r in results)
    zero_wall = statistics.median(r[0] for r in zero_results)
    from ckptprobe.analysis import kernels  # after the timed runs: they must not fork from a larger process

    scan = scan_seconds(base, runs, args.repeat)
    scan_numpy = scan_seconds(base, runs, args.repeat, compiled=False)

    print(f"consensus of {args.runs} runs, {args.layers} layers, {len(files)} files, {size / 1e9:.2f} GB; "
          f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at the end")
    print(f"ckptprobe consensus (whole process): {wall:.2f} s  ({size / wall / 1e9:.2f} GB/s; CPU time {cpu:.2f} s)")
    print(f"cat > /dev/null (page cache):        {read:.2f} s  ({size / read / 1e9:.2f} GB/s)")
    print(f"fraction of read throughput:         {read / wall:.2f}x  (target >= 0.8x)")
    print(f"scan alone, in process:              {scan:.2f} s  ({read / scan:.2f}x cat; start-up and output: "
          f"{wall - scan:.2f} s of the whole process)")
    print(f"  the same on the numpy path:        {scan_numpy:.2f} s  ({read / scan_numpy:.2f}x cat; compiled loops "
          f"{'built' if kernels.compiled is not None else 'NOT built: both lines take the numpy path'})")
    print(f"peak RSS of consensus:               {rss / 2**20:.0f} MiB  (target < 2048 MiB)")
    print(f"base with an exact zero per 4096:    {zero_wall:.2f} s  (slowdown {zero_wall / wall:.2f}x; target ~1.0x)")
    if getattr(kernels.compiled, "mark16_files", None) is not None:
        print("where the scan's time goes (two forked processes, every other chunk each; CPU of both):")
        for what, (w, user, system) in zip(STAGES, stage_seconds(files, args.repeat)):
            print(f"  {what:36s} {w:.2f} s  (user {user:.2f} s, sys {system:.2f} s)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
