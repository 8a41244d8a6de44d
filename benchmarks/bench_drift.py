"""Speed of `ckptprobe drift` on a base and T checkpoints of a Qwen2.5-1.5B-shaped model (bf16).

Prints, measured in one run: the whole process as a user runs it (`python -m ckptprobe drift
BASE CKPT...`, median of --repeat), `cat` of the same files from the page cache, their ratio,
then the sums alone in this process (no start-up) with the compiled loop (`norms_files`, which
reads the files itself) and on the numpy path an install without a C compiler takes (run once:
it is slow), and whether the two give the same norms (float64 sums, relative 1e-9).

    python benchmarks/bench_drift.py                       # 4 layers, 3 checkpoints, in a temp dir
    python benchmarks/bench_drift.py --dir /tmp/drift      # files kept there and reused
    python benchmarks/bench_drift.py --float32             # the same series saved in float32
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

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synth import scan_median  # noqa: E402


def timed(cmd: list[str]) -> float:
    """Wall seconds of `cmd`, stdout to /dev/null."""
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def write_series(files: list[Path], layers: int, float32: bool) -> None:
    """In a child process (its memory must not stay in ours): a base and checkpoints one ULP apart
    from it in 40% of entries each; `float32` saves the same values as float32."""
    code = (f"from synth import write_pair; write_pair({str(files[0])!r}, {list(map(str, files[1:]))!r}, "
            f"layers={layers})")
    if float32:
        code += ("; import numpy as np; from ckptprobe.io.sources import open_source; "
                 "from ckptprobe.io.writer import write_safetensors\n"
                 f"for f in {list(map(str, files))!r}:\n"
                 "    s = open_source(f)\n"
                 "    t = {n: ('F32', (s.get_array(n).astype(np.uint32) << 16).view(np.float32)) for n in s.keys()}\n"
                 "    write_safetensors(f, t)")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints after the base, T")
    ap.add_argument("--float32", action="store_true", help="the series in float32 instead of bf16")
    ap.add_argument("--dir", type=Path, help="keep the files here and reuse them if present")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.dir = Path(tmp.name)
    folder = args.dir / f"drift-{args.layers}l-{'f32' if args.float32 else 'bf16'}"
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"ckpt{t}.safetensors" for t in range(args.checkpoints + 1)]
    if not all(f.exists() for f in files):
        print(f"writing {len(files)} synthetic checkpoints into {folder} ...", file=sys.stderr)
        write_series(files, args.layers, args.float32)
    size = sum(f.stat().st_size for f in files)
    paths = list(map(str, files))

    subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    load = os.getloadavg()[0]
    read = statistics.median(timed(["cat", *paths]) for _ in range(args.repeat))
    whole = statistics.median(timed([sys.executable, "-m", "ckptprobe", "drift", *paths, "-f", "json"])
                              for _ in range(args.repeat))

    from ckptprobe import drift, open_source
    from ckptprobe.analysis import kernels

    results = {}

    def run(key):
        def call():
            results[key] = drift(open_source(paths[0]), [open_source(p) for p in paths[1:]])
        return call

    scan = scan_median(run("compiled"), args.repeat)
    scan_numpy = scan_median(run("numpy"), 1, compiled=False)
    same = all(np.allclose(np.concatenate([a.norms.sq, a.norms.to_base, a.norms.step]),
                           np.concatenate([b.norms.sq, b.norms.to_base, b.norms.step]), rtol=1e-9, atol=0)
               for a, b in zip(results["compiled"].tensors, results["numpy"].tensors))

    dtype = "float32" if args.float32 else "bf16"
    print(f"drift of {args.checkpoints} checkpoints, {args.layers} layers, {dtype}, {len(files)} files, "
          f"{size / 1e9:.2f} GB; load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at the end")
    print(f"ckptprobe drift (whole process): {whole:.2f} s  ({size / whole / 1e9:.2f} GB/s)")
    print(f"cat > /dev/null (page cache):    {read:.2f} s  ({size / read / 1e9:.2f} GB/s)")
    print(f"fraction of read throughput:     {read / whole:.2f}x")
    print(f"sums alone, in process:          {scan:.2f} s  ({read / scan:.2f}x cat; compiled loops "
          f"{'built' if kernels.compiled is not None else 'NOT built: both lines take the numpy path'})")
    print(f"  the same on the numpy path:    {scan_numpy:.2f} s  ({scan_numpy / scan:.1f}x the compiled loop's time)")
    print(f"same norms on both paths:        {'yes' if same else 'NO'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
