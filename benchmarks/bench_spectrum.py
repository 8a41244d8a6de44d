"""Benchmark: the full `ckptprobe spectrum` job on Qwen2.5-1.5B-shaped matrices, ckptprobe's batched
engine vs per-matrix SVD loops.

The job, for a base and one fine-tune: every singular value (for NSS) and the top-64 singular
vectors (for principal angles) of every 2-D weight. Contenders, all reading the same bf16 files:

- ckptprobe: `ckptprobe.analysis.spectrum.spectrum` (fp32, tall orientation, same-shape batches,
  values-only + randomized top-k for matrices with a side >= 8192), on CPU and on CUDA if present;
- numpy loop (WeightWatcher-style): `numpy.linalg.svd(W, full_matrices=False)` per matrix (float64
  inside), then the same metrics;
- torch loop: `torch.linalg.svd(W, full_matrices=False)` per matrix as stored (fp32), on each device.

The loops cost the same for every matrix of a shape, and the same for base and fine-tune, so they
are timed on the base's first matrix of each distinct shape, doubled (base + fine-tune) and
multiplied by the shape's count (`--loops-all` times every matrix of both checkpoints instead). ckptprobe is
timed on the whole synthetic model (`--layers` layers + the embedding), split into the layers and
the embedding so that both project to the real 28 layers. Seconds are per model (base + fine-tune).

The embedding (151936 x 1536) alone takes the numpy loop ~3 minutes per SVD on this loaded machine,
so by default it is synthesized with `--embedding-rows 18992` (1/8) and every contender's embedding
time is scaled by 151936/rows: the SVD of a tall m x n matrix costs O(m n^2), linear in m (this
overstates ckptprobe's n x n part, so it is conservative for ckptprobe). `--embedding-rows 151936`
times the real shape.

    python benchmarks/bench_spectrum.py                 # 2 layers + 1/8 embedding, CPU (and CUDA), ~3 min here
    python benchmarks/bench_spectrum.py --layers 28 --embedding-rows 151936 --threads 0 --loops-all  # GPU box

Threads: default 1 for torch and OpenBLAS alike. On this shared 2-core machine a second OpenMP
thread makes LAPACK 3-15x *slower* under load (PERF_NOTES measured 1.7-2.3x faster when idle);
`--threads 0` keeps each library's own default.
"""

from __future__ import annotations

import argparse
import os
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


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
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

        def loop(job) -> tuple[float, float]:
            """(seconds on this synthetic model, projected seconds for the full model)."""
            here = projected = 0.0
            for s, names in by_shape.items():
                todo = [(src, n) for n in names for src in (a, b)] if args.loops_all else [(a, names[0])]
                secs = [timed(lambda src=src, n=n: job(to_float32(src.get_array(n), "BF16"))) for src, n in todo]
                per = 2 * sum(secs) / len(secs)  # a pair: base + fine-tune
                here += per * len(names)
                projected += per * counts[s]
                print(f"    {s[0]}x{s[1]}: {per:.2f} s per matrix pair", flush=True)
            return here, projected

        def engine(device: str) -> tuple[float, float]:
            layers = timed(lambda: spectrum(a, [b], k=args.k, include=["*.layers.*"], device=device))
            emb = 0.0 if args.no_embedding else timed(
                lambda: spectrum(a, [b], k=args.k, include=["*embed_tokens*"], device=device))
            print(f"    layers {layers:.2f} s, embedding {emb:.2f} s", flush=True)
            return layers + emb, layers * FULL_LAYERS / args.layers + emb * scale

        results = {}
        for device in devices:
            spectrum(a, [b], k=4, include=["*.layers.0.self_attn.k_proj*"], device=device)  # warm-up (CUDA init)
            print(f"ckptprobe engine on {device}:", flush=True)
            results[f"ckptprobe ({device})"] = engine(device)
            print(f"torch per-matrix loop on {device}:", flush=True)
            results[f"torch loop ({device})"] = loop(lambda w, k=args.k, d=device: torch_job(w, k, d))
        if not args.skip_numpy:
            print("numpy per-matrix loop (float64 inside):", flush=True)
            results["numpy loop (cpu)"] = loop(lambda w, k=args.k: numpy_job(w, k))

    print(f"\nseconds per model (base + fine-tune, values + top-{args.k} vectors):")
    print(f"{'':22} {'this model':>11} {'Qwen2.5-1.5B (28 layers)':>26}")
    for name, (here, proj) in results.items():
        print(f"{name:22} {here:11.1f} {proj:26.1f}")
    print("\nratios (projected full model; > 1: ckptprobe faster):")
    for device in devices:
        ours = results[f"ckptprobe ({device})"][1]
        for name, (_, proj) in results.items():
            if not name.startswith("ckptprobe"):
                print(f"  ckptprobe ({device}) vs {name}: {proj / ours:.1f}x")


if __name__ == "__main__":
    main()
