"""Benchmark `ckptprobe sparsity` on a pair of ~1.5 GB bf16 checkpoints (Qwen2.5-1.5B shapes).

Compares, in one run, three whole processes reading the same page-cached pair:

- `cat base ft > /dev/null`: the speed of reading the bytes at all;
- `ckptprobe sparsity base ft --format json`, as a user runs it (the console script next to
  `sys.executable`, start-up included; median of `--repeats`);
- the naive approach of earlier code: `safetensors.torch.load_file` both, upcast to fp32,
  count `~torch.isclose(a, b, atol=1e-5, rtol=0)` (run once: it is slow).

then times the scan alone in this process (`ckptprobe.sparsity`, no interpreter or import start-up;
one worker and the default, every CPU; then every CPU on the numpy path, which an install without
a C compiler takes) to show where a whole run's time goes, and prints seconds, GB/s, peak RSS (`ru_maxrss` of each child from `os.wait4`; it counts the
file pages a process has mapped, so a reader that mmaps whole files shows their size), peak
private memory, the ratios against the targets, and whether each count is right (a numpy
reference counts the bitwise differences from the raw file bytes).

    python benchmarks/bench_sparsity.py                 # writes the pair to a temp dir, then deletes it
    python benchmarks/bench_sparsity.py --dir /tmp/bench  # reuses base/ft.safetensors there (or writes them)

`--float32` times float32 checkpoints instead, as trainers that save full-precision weights
write them: two float32 files compared bitwise, and a bf16 base against a float32 fine-tune
(the default mode for that pair rounds it to bf16), each against `cat` of the same files;
4 layers unless `--layers` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synth import scan_median, write_pair  # noqa: E402

from ckptprobe import open_source, sparsity  # noqa: E402
from ckptprobe.analysis import kernels  # noqa: E402
from ckptprobe.analysis.runner import default_workers  # noqa: E402

NAIVE = r"""
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
print(sum(int((~torch.isclose(a[k].float(), b[k].float(), atol=1e-5, rtol=0)).sum()) for k in a))
"""
TARGET_VS_READ, TARGET_VS_NAIVE, TARGET_RSS = 1.0, 5.0, 1 << 30


# Each command is started by this small helper rather than by the benchmark itself: Linux charges
# a child with the peak RSS of the memory it was forked (or vforked) from, and this process holds
# gigabytes after writing the pair. The helper (~10 MB) forks, execs, and reports the wall time,
# the child's ru_maxrss, and its peak private memory (RssAnon sampled every 10 ms).
HELPER = r"""
import os, sys, threading, time
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(out, 1)
    os.execvp(sys.argv[2], sys.argv[2:])
anon = [0]

def sample():
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                anon[0] = max([anon[0]] + [int(line.split()[1]) for line in f if line.startswith("RssAnon:")])
        except (OSError, ValueError):
            return
        time.sleep(0.01)

threading.Thread(target=sample, daemon=True).start()
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, anon[0], os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], out_path: str = os.devnull) -> tuple[float, int, int, str]:
    """Run `cmd` -> (wall seconds, peak RSS bytes, peak private (anonymous) RSS bytes, its stdout)."""
    p = subprocess.run([sys.executable, "-c", HELPER, out_path, *cmd], capture_output=True, text=True)
    seconds, rss, anon, code = p.stdout.split()
    if p.returncode or int(code):
        raise SystemExit(f"{cmd[0]} failed ({code}): {p.stderr[-2000:]}")
    return float(seconds), int(rss) * 1024, int(anon) * 1024, "" if out_path == os.devnull else Path(out_path).read_text()


def reference_counts(a_path: Path, b_path: Path) -> tuple[int, int]:
    """From the raw bytes, independently of ckptprobe's reader: (entries whose bf16 bits differ,
    of those, entries where min(|w|, |w'|) < 2^-9, where one bf16 ULP <= 2^-17 < 1e-5)."""
    def layout(path):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        return 8 + n, header

    (start_a, ha), (start_b, hb) = layout(a_path), layout(b_path)
    ma = np.memmap(a_path, np.uint16, "r", start_a)
    mb = np.memmap(b_path, np.uint16, "r", start_b)
    changed = small = 0
    step = 1 << 24
    for name, ea in ha.items():
        eb = hb[name]
        assert ea["dtype"] == eb["dtype"] == "BF16" and ea["shape"] == eb["shape"]
        a0, a1 = (o // 2 for o in ea["data_offsets"])
        b0 = eb["data_offsets"][0] // 2
        for i in range(0, a1 - a0, step):
            x, y = ma[a0 + i:min(a0 + i + step, a1)], mb[b0 + i:b0 + i + min(step, a1 - a0 - i)]
            diff = x != y
            changed += int(np.count_nonzero(diff))
            # |w| < 2^-9 <=> magnitude bits below 0x3B00 (exponent 127 - 9)
            small += int(np.count_nonzero(diff & (np.minimum(x & 0x7FFF, y & 0x7FFF) < 0x3B00)))
    return changed, small


def scan_seconds(a: Path, b: Path, workers: int | None, repeats: int, compiled: bool = True) -> float:
    """Median seconds of the `sparsity` API on the pair in this process: the scan without start-up."""
    return scan_median(lambda: sparsity(open_source(a), open_source(b), workers=workers), repeats, compiled)


def float32_case(folder: Path, layers: int, repeats: int) -> None:
    """bf16 base and fine-tune bits B, F (40% one ULP apart), written as: base.bf16 (B), base.f32 (B
    exactly, in float32) and ft.f32 (F in float32, with noise below half a bf16 ULP in the low bits
    of one entry in ten). Bitwise, the float32 pair differs where F != B or the noise is; rounded
    to bf16, ft.f32 differs from base.bf16 exactly where F != B. Both counts come from the bits
    here, not from ckptprobe."""
    from synth import base_tensor, one_ulp_apart, qwen_shapes

    from ckptprobe.io.writer import write_safetensors

    paths = {k: folder / f"{k}.safetensors" for k in ("base-bf16", "base-f32", "ft-f32")}
    rng = np.random.default_rng(0)
    want_f32 = want_rounded = 0
    tensors = {k: {} for k in paths}
    for i, (name, shape) in enumerate(qwen_shapes(layers).items()):
        b = base_tensor(shape, i)
        f = one_ulp_apart(b, 0.4, 1000 + i)
        noise = np.where(rng.random(b.shape) < 0.1, rng.integers(1, 0x7FFF, b.shape, dtype=np.uint32), 0)
        ft32 = (f.astype(np.uint32) << 16) | noise.astype(np.uint32)
        tensors["base-bf16"][name] = ("BF16", b)
        tensors["base-f32"][name] = ("F32", (b.astype(np.uint32) << 16).view(np.float32))
        tensors["ft-f32"][name] = ("F32", ft32.view(np.float32))
        want_f32 += int(np.count_nonzero((f != b) | (noise != 0)))
        want_rounded += int(np.count_nonzero(f != b))
    if not all(p.is_file() for p in paths.values()):
        for k, p in paths.items():
            write_safetensors(p, tensors[k])
    del tensors
    exe = str(Path(sys.executable).parent / "ckptprobe")
    out_json = str(folder / ".bench_sparsity.json")
    print(f"float32 checkpoints, {layers} layers, in {folder}; median of {repeats} runs; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    for label, a, b, want in (("float32 vs float32 (bitwise)", "base-f32", "ft-f32", want_f32),
                              ("bf16 vs float32 (mode bf16)", "base-bf16", "ft-f32", want_rounded)):
        files = [str(paths[a]), str(paths[b])]
        measure(["cat", *files])  # warm-up
        cat = statistics.median(measure(["cat", *files])[0] for _ in range(repeats))
        runs = [measure([exe, "sparsity", *files, "--format", "json"], out_json) for _ in range(repeats)]
        ours = statistics.median(r[0] for r in runs)
        got = json.loads(runs[-1][3])["total"]["changed"]
        size = sum(Path(f).stat().st_size for f in files)
        print(f"{label}: {gb(size)}; cat {cat:.2f} s, ckptprobe {ours:.2f} s ({cat / ours:.2f}x cat's throughput; "
              f"peak RSS {max(r[1] for r in runs) / 2**20:.0f} MiB); changed {got:,}, from the bits "
              f"{want:,} ({'right' if got == want else 'WRONG'})")
    Path(out_json).unlink(missing_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="folder holding (or to receive) base.safetensors and ft.safetensors")
    parser.add_argument("--layers", type=int, default=14, help="layers of the synthetic pair if written (14: ~1.5 GB)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of cat and of ckptprobe (median reported)")
    parser.add_argument("--float32", action="store_true", help="instead: float32 checkpoints (see above)")
    args = parser.parse_args()
    if args.float32:
        layers = args.layers if args.layers != 14 else 4
        if args.dir:
            args.dir.mkdir(parents=True, exist_ok=True)
            return float32_case(args.dir, layers, args.repeats)
        with tempfile.TemporaryDirectory(prefix="bench_sparsity_f32_") as tmp:
            return float32_case(Path(tmp), layers, args.repeats)

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="bench_sparsity_")
    folder = args.dir or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    a, b = folder / "base.safetensors", folder / "ft.safetensors"
    if not (a.is_file() and b.is_file()):
        print(f"writing {a} and {b} ({args.layers} layers, 40% of entries one ULP apart)...", file=sys.stderr)
        write_pair(a, [b], layers=args.layers)
    size = a.stat().st_size + b.stat().st_size
    exe = Path(sys.executable).parent / "ckptprobe"
    out_json = str(folder / ".bench_sparsity.json")
    load = os.getloadavg()[0]
    try:
        measure(["cat", str(a), str(b)])  # warm-up: both files into the page cache
        baseline = measure(["true"])
        cat = [measure(["cat", str(a), str(b)]) for _ in range(args.repeats)]
        ours = [measure([str(exe), "sparsity", str(a), str(b), "--format", "json"], out_json)
                for _ in range(args.repeats)]
        ours_changed = json.loads(ours[-1][3])["total"]["changed"]
        scans = {w: scan_seconds(a, b, w, args.repeats) for w in (1, None)}
        scan_numpy = scan_seconds(a, b, None, args.repeats, compiled=False)
        naive = measure([sys.executable, "-c", NAIVE, str(a), str(b)], out_json)
        naive_changed = int(naive[3])
        ref_changed, ref_small = reference_counts(a, b)
    finally:
        Path(out_json).unlink(missing_ok=True)
        if tmp:
            tmp.cleanup()

    def row(label, runs):
        s = statistics.median(r[0] for r in runs)
        rss, anon = max(r[1] for r in runs), max(r[2] for r in runs)
        print(f"{label:46}{s:8.2f}{size / s / 1e9:8.2f}{rss / 2**20:10.0f} MiB{anon / 2**20:10.0f} MiB")
        return s, rss

    print(f"pair: {a.name} + {b.name} in {folder}: {gb(size)} in all; {os.cpu_count()} CPUs; "
          f"median of {args.repeats} runs (naive: 1 run); load average {load:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"{'':46}{'seconds':>8}{'GB/s':>8}{'peak RSS':>14}{'private':>14}")
    cat_s, _ = row("cat base ft > /dev/null (page cache)", cat)
    ours_s, ours_rss = row("ckptprobe sparsity --format json", ours)
    naive_s, _ = row("naive: load_file, fp32, ~isclose(atol=1e-5)", [naive])
    for w, s in scans.items():
        label = f"scan alone, in process, {'1 worker' if w == 1 else f'{default_workers()} workers (default)'}"
        print(f"{label:46}{s:8.2f}{size / s / 1e9:8.2f}   ({cat_s / s:.2f}x cat)")
    label = "  the same on the numpy path"
    print(f"{label:46}{scan_numpy:8.2f}{size / scan_numpy / 1e9:8.2f}   ({cat_s / scan_numpy:.2f}x cat; compiled loops "
          f"{'built' if kernels.compiled is not None else 'NOT built: both lines take the numpy path'})")
    print(f"start-up and output of a whole run: {ours_s - scans[None]:.2f} s of its {ours_s:.2f} s")
    print(f"(peak RSS counts mapped file pages; a process that does nothing shows {baseline[1] / 2**20:.0f} MiB "
          "here, copied from the measuring helper at fork; private = RssAnon sampled every 10 ms)")
    print(f"ckptprobe throughput / cat throughput: {cat_s / ours_s:.2f}x (target >= {TARGET_VS_READ}x: "
          f"{'met' if cat_s / ours_s >= TARGET_VS_READ else 'NOT met'})")
    print(f"naive time / ckptprobe time:           {naive_s / ours_s:.1f}x (target >= {TARGET_VS_NAIVE}x: "
          f"{'met' if naive_s / ours_s >= TARGET_VS_NAIVE else 'NOT met'})")
    print(f"ckptprobe peak RSS:                    {ours_rss / 2**20:.0f} MiB (target < 1 GiB: "
          f"{'met' if ours_rss < TARGET_RSS else 'NOT met'})")
    print(f"changed entries: reference {ref_changed:,}; ckptprobe {ours_changed:,} "
          f"({'right' if ours_changed == ref_changed else 'WRONG'}); naive {naive_changed:,} "
          f"({'right' if naive_changed == ref_changed else 'WRONG'}: misses {ref_changed - naive_changed:,})")
    print(f"changes where min(|w|,|w'|) < 2^-9 (one bf16 ULP < atol): {ref_small:,}; "
          f"the naive count {'equals' if naive_changed == ref_changed - ref_small else 'does NOT equal'} "
          "reference minus these")


if __name__ == "__main__":
    main()
