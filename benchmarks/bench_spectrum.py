"""Benchmark: the full `ckptprobe spectrum` job on Qwen2.5-1.5B-shaped matrices, ckptprobe's engine
vs per-matrix SVD loops.

The job, for a base and one fine-tune: every singular value (for NSS) and the top-64 singular
vectors (for principal angles) of every 2-D weight. Contenders, all reading the same bf16 files:

- ckptprobe: `ckptprobe.analysis.spectrum.spectrum` (on CPU: float64 Gram matrices, one
  tridiagonal reduction per matrix), on one core, then with `--cores` worker processes (the
  engine spends the torch thread count on processes, one single-threaded matrix each); on
  CUDA too if present;
- numpy loop (WeightWatcher-style): `numpy.linalg.svd(W, full_matrices=False)` per matrix (float64
  inside), then the same metrics;
- torch loop: `torch.linalg.svd(W, full_matrices=False)` per matrix as stored (fp32), on each device.

Every contender's BLAS/LAPACK runs on `--threads` threads (default 1), so "one core" rows compare
like with like. Seconds are wall time; "cpu" is the CPU time of the process and its workers,
which a busy machine inflates far less than wall time (the one-core ratio is best read from it).

The loops cost the same for every matrix of a shape, and the same for base and fine-tune, so they
are timed on the base's first matrix of each distinct shape, doubled (base + fine-tune) and
multiplied by the shape's count (`--loops-all` times every matrix of both checkpoints instead). ckptprobe is
timed on the whole synthetic model (`--layers` layers + the embedding), split into the layers and
the embedding so that both project to the real 28 layers. Seconds are per model (base + fine-tune).

The embedding (151936 x 1536) alone takes the numpy loop minutes per SVD on a loaded machine,
so by default it is synthesized with `--embedding-rows 18992` (1/8) and every contender's embedding
time is scaled by 151936/rows: the cost of a tall m x n matrix is linear in m for every contender
(m n^2 for the Gram matrix or the QR/bidiagonal reduction) plus an n^3 part that this scaling
overstates, which is conservative for ckptprobe, whose n^3 part is the larger share.
`--embedding-rows 151936` times the real shape.

    python benchmarks/bench_spectrum.py                 # 2 layers + 1/8 embedding, CPU (and CUDA), ~5 min here
    python benchmarks/bench_spectrum.py --layers 28 --embedding-rows 151936 --threads 0 --loops-all  # GPU box

Threads: default 1 for torch and OpenBLAS alike. On a shared machine a second OpenMP thread makes
LAPACK 3-15x *slower* under load; `--threads 0` keeps each library's own default.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

FULL_LAYERS = 28  # Qwen2.5-1.5B
VOCAB = 151936


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers to synthesize (default 2)")
    p.add_argument("--no-embedding", action="store_true", help="leave out the embedding")
    p.add_argument("--embedding-rows", type=int, default=VOCAB // 8,
                   help=f"rows of the synthetic embedding (default {VOCAB // 8}; the real one has {VOCAB})")
    p.add_argument("-k", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and numpy (0: their default)")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="worker processes for the engine's second CPU run (default: the CPUs usable)")
    p.add_argument("--loops-all", action="store_true", help="time the loops on every matrix, not one per shape")
    p.add_argument("--skip-numpy", action="store_true", help="leave out the (slowest) numpy loop")
    return p.parse_args()


args = parse()
if args.threads:  # before numpy/torch load their BLAS
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import base_tensor, one_ulp_apart, qwen_shapes  # noqa: E402

from ckptprobe.analysis.bf16 import to_float32  # noqa: E402
from ckptprobe.analysis.spectrum import spectrum  # noqa: E402
from ckptprobe.io.sources import open_source  # noqa: E402
from ckptprobe.io.writer import write_safetensors  # noqa: E402

if args.threads:
    torch.set_num_threads(args.threads)


def angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.linalg.svd(a.T @ b, compute_uv=False)
    return np.degrees(np.arccos(np.clip(cos, 0, 1)))[::-1]


def numpy_job(w: np.ndarray, k: int) -> None:
    """One matrix's share of the job: the thin SVD (values for NSS, top-k vectors for the angles)
    and one side of the metrics (their cost is negligible next to the SVD)."""
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    np.linalg.norm(s), angles_deg(u[:, :k], u[:, :k]), angles_deg(vh[:k].T, vh[:k].T)


def torch_job(w: np.ndarray, k: int, device: str) -> None:
    u, s, vh = torch.linalg.svd(torch.from_numpy(w).to(device), full_matrices=False)
    torch.linalg.vector_norm(s), torch.linalg.svdvals(u[:, :k].mT @ u[:, :k]), torch.linalg.svdvals(vh[:k] @ vh[:k].mT)


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the engine's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


CPU_TIME = [0.0]  # CPU seconds of the last `timed` call


def timed(fn) -> float:
    t, c = time.perf_counter(), cpu_seconds()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    CPU_TIME[0] = cpu_seconds() - c
    return time.perf_counter() - t


def main() -> None:
    shapes = {n: s for n, s in qwen_shapes(args.layers).items()
              if len(s) == 2 and not (args.no_embedding and "embed" in n)}
    embed = "model.embed_tokens.weight"
    scale = VOCAB / args.embedding_rows  # projected embedding time per measured one
    if embed in shapes:
        shapes[embed] = (args.embedding_rows, shapes[embed][1])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"Qwen2.5-1.5B shapes: {args.layers} layers"
          f"{'' if args.no_embedding else f' + embedding of {args.embedding_rows} rows'}, "
          f"{len(shapes)} matrices, k={args.k}; threads {args.threads or 'default'} "
          f"(torch {torch.get_num_threads()}); devices {devices}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        base = {n: ("BF16", base_tensor(s, i)) for i, (n, s) in enumerate(shapes.items())}
        write_safetensors(Path(tmp) / "base.safetensors", base)
        write_safetensors(Path(tmp) / "ft.safetensors",
                          {n: ("BF16", one_ulp_apart(b, 0.4, 1000 + i)) for i, (n, (_, b)) in enumerate(base.items())})
        del base
        print(f"synthesized in {time.perf_counter() - t:.1f} s", flush=True)
        a, b = open_source(str(Path(tmp) / "base.safetensors")), open_source(str(Path(tmp) / "ft.safetensors"))

        # per-model projection: count of each shape in the real model (28 layers, one embedding)
        full = {n: s for n, s in qwen_shapes(FULL_LAYERS).items() if len(s) == 2 and n != embed}
        counts: dict[tuple, float] = {shapes[embed]: scale} if embed in shapes else {}
        for s in full.values():
            counts[s] = counts.get(s, 0) + 1
        by_shape: dict[tuple, list[str]] = {}
        for n, s in shapes.items():
            by_shape.setdefault(s, []).append(n)

        def loop(job) -> tuple[float, float, float]:
            """(wall seconds on this synthetic model, projected wall and CPU seconds for the full model)."""
            here = projected = cpu = 0.0
            for s, names in by_shape.items():
                todo = [(src, n) for n in names for src in (a, b)] if args.loops_all else [(a, names[0])]
                secs, cpus = [], []
                for src, n in todo:
                    secs.append(timed(lambda src=src, n=n: job(to_float32(src.get_array(n), "BF16"))))
                    cpus.append(CPU_TIME[0])
                per, per_cpu = 2 * sum(secs) / len(secs), 2 * sum(cpus) / len(cpus)  # a pair: base + fine-tune
                here += per * len(names)
                projected += per * counts[s]
                cpu += per_cpu * counts[s]
                print(f"    {s[0]}x{s[1]}: {per:.2f} s per matrix pair (cpu {per_cpu:.2f} s)", flush=True)
            return here, projected, cpu

        def engine(device: str) -> tuple[float, float, float]:
            layers = timed(lambda: spectrum(a, [b], k=args.k, include=["*.layers.*"], device=device))
            layers_cpu = CPU_TIME[0]
            emb = emb_cpu = 0.0
            if not args.no_embedding:
                emb = timed(lambda: spectrum(a, [b], k=args.k, include=["*embed_tokens*"], device=device))
                emb_cpu = CPU_TIME[0]
            print(f"    layers {layers:.2f} s (cpu {layers_cpu:.2f} s), embedding {emb:.2f} s (cpu {emb_cpu:.2f} s)",
                  flush=True)
            per_model = FULL_LAYERS / args.layers
            return layers + emb, layers * per_model + emb * scale, layers_cpu * per_model + emb_cpu * scale

        results = {}
        for device in devices:
            spectrum(a, [b], k=4, include=["*.layers.0.self_attn.k_proj*"], device=device)  # warm-up (CUDA init)
            print(f"ckptprobe engine on {device}, one core:", flush=True)
            results[f"ckptprobe ({device}, 1 core)"] = engine(device)
            if device == "cpu" and args.cores > 1:
                print(f"ckptprobe engine on cpu, {args.cores} worker processes:", flush=True)
                torch.set_num_threads(args.cores)  # the engine's CPU budget, spent on worker processes
                results[f"ckptprobe (cpu, {args.cores} cores)"] = engine(device)
                torch.set_num_threads(args.threads or torch.get_num_threads())
            print(f"torch per-matrix loop on {device}:", flush=True)
            results[f"torch loop ({device})"] = loop(lambda w, k=args.k, d=device: torch_job(w, k, d))
        if not args.skip_numpy:
            print("numpy per-matrix loop (float64 inside):", flush=True)
            results["numpy loop (cpu)"] = loop(lambda w, k=args.k: numpy_job(w, k))

    print(f"\nseconds per model (base + fine-tune, values + top-{args.k} vectors):")
    print(f"{'':26} {'this model':>11} {'Qwen2.5-1.5B (28 layers)':>26} {'cpu, 28 layers':>15}")
    for name, (here, proj, cpu) in results.items():
        print(f"{name:26} {here:11.1f} {proj:26.1f} {cpu:15.1f}")
    print("\nratios (projected full model; > 1: ckptprobe faster), wall and cpu:")
    for ours_name, (_, ours, ours_cpu) in results.items():
        if ours_name.startswith("ckptprobe"):
            for name, (_, proj, cpu) in results.items():
                if not name.startswith("ckptprobe"):
                    print(f"  {ours_name} vs {name}: wall {proj / ours:.1f}x, cpu {cpu / ours_cpu:.1f}x")


if __name__ == "__main__":
    main()
