"""Seconds per model for `ckptprobe masks --kind safe` on Qwen2.5-1.5B shapes, vs a numpy full-SVD loop.

    python benchmarks/bench_masks.py              # 1 layer + embedding: ~1 min on 2 idle cores
    python benchmarks/bench_masks.py --layers 4 --baseline-layers 2 --baseline-embed

ckptprobe: `build_masks` (the `masks` command's work: read each bf16 matrix, rank-k
reconstruction through the SVD engine with its default `auto` method, Top/Bottom-alpha
selection, bit packing, base fingerprints) timed tensor by tensor on a synthetic checkpoint
of `--layers` layers, then the mask file written. Baseline: the straightforward per-matrix
loop, `numpy.linalg.svd` (full, float64 inside), rank-k reconstruction, `argsort` for
Top/Bottom-alpha, on every matrix of `--baseline-layers` layers and, with
`--baseline-embed`, the 151936 x 1536 embedding (minutes more). Each baseline matrix is
timed right after ckptprobe's work on the same matrix, so on a shared machine both see the
same load; the per-layer ratio comes from these pairs. Per model (the 28 layers of
Qwen2.5-1.5B): embedding + 28 x the mean layer; without `--baseline-embed` the baseline's
embedding is counted at ckptprobe's own time (so its projection is a lower bound).
The synthetic weights are Gaussian: timings are representative, principal masks are not
(a flat spectrum has no principal structure).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synth import qwen_shapes, write_pair  # noqa: E402

from ckptprobe.analysis.bf16 import bf16_bits_to_float32  # noqa: E402
from ckptprobe.analysis.mask_expr import parse_expression  # noqa: E402
from ckptprobe.analysis.mask_select import default_rank, keep_count  # noqa: E402
from ckptprobe.analysis.masks import MaskSpec, MatrixMasks, Vectors, build_masks  # noqa: E402
from ckptprobe.io.maskfile import fingerprint, write_packed  # noqa: E402
from ckptprobe.io.names import parse_name  # noqa: E402
from ckptprobe.io.sources import open_source  # noqa: E402

LAYERS_1_5B = 28
ALPHA = 0.05


def numpy_safe_mask(w: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """The baseline: full SVD, rank-k reconstruction, argsort for Top_alpha and Bottom_alpha."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    recon = (u[:, :k] * s[:k]) @ vt[:k]
    c = keep_count(alpha, w.size)
    principal = np.zeros(w.size, bool)
    principal[np.argsort(-np.abs(recon).reshape(-1), kind="stable")[:c]] = True
    low = np.zeros(w.size, bool)
    low[np.argsort(np.abs(w).reshape(-1), kind="stable")[:c]] = True
    return (low | ~principal).reshape(w.shape)


def ckptprobe_one(src, name: str) -> float:
    """Seconds for `build_masks`' work on one matrix: read, fingerprint, safe mask, pack."""
    t0 = time.perf_counter()
    info, raw = src.info(name), src.get_array(name)
    fingerprint(raw, info.dtype)
    mask = parse_expression("safe").evaluate(MatrixMasks(name, raw, info.dtype, MaskSpec("safe", alpha=ALPHA)))
    np.packbits(mask.reshape(-1), bitorder="little")
    return time.perf_counter() - t0


def project(per_tensor: dict[str, float]) -> tuple[float, float, float]:
    """(embedding seconds, mean seconds per layer, 28-layer projection) from per-tensor times."""
    embed = sum(t for n, t in per_tensor.items() if parse_name(n).layer is None)
    layers: dict[int, float] = {}
    for n, t in per_tensor.items():
        layer = parse_name(n).layer
        if layer is not None:
            layers[layer] = layers.get(layer, 0.0) + t
    per_layer = sum(layers.values()) / len(layers)
    return embed, per_layer, embed + LAYERS_1_5B * per_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1, help="layers in the synthetic checkpoint (default 1)")
    ap.add_argument("--baseline-layers", type=int, default=1, help="layers the numpy baseline runs on (default 1)")
    ap.add_argument("--baseline-embed", action="store_true", help="also time the baseline on the embedding")
    args = ap.parse_args()
    from ckptprobe._threads import configure

    configure(None)  # the thread policy every command applies (one thread per CPU not busy now)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.safetensors"
        write_pair(path, [], layers=args.layers)
        src = open_source(str(path))

        # ckptprobe, tensor by tensor through the progress callback
        marks, names = [time.perf_counter()], list(src.keys())
        t0 = time.perf_counter()
        result = build_masks(src, MaskSpec("safe", alpha=ALPHA), kind="safe", vectors=Vectors.train,
                             progress=lambda n: marks.append(time.perf_counter()))
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_packed(Path(tmp) / "safe.safetensors", result.packed(), result.recipe, result.fingerprints)
        t_write = time.perf_counter() - t0
        ours = dict(zip(names, np.diff(marks)))
        o_embed, o_layer, o_model = project(ours)
        numel = lambda shapes: sum(int(np.prod(x)) for x in shapes.values())  # noqa: E731
        o_model += t_write * numel(qwen_shapes(LAYERS_1_5B)) / numel(qwen_shapes(args.layers))  # ~ file size
        print(f"ckptprobe masks --kind safe, {args.layers} layer(s) + embedding: build {t_build:.1f} s, "
              f"write {t_write:.2f} s; embedding {o_embed:.1f} s, {o_layer:.2f} s per layer")

        # baseline: one matrix at a time, every 2-D shape of `baseline_layers` layers; each timed right after
        # ckptprobe's work on the same matrix, so both see the same load on a shared machine
        pairs = {}
        todo = [n for n in names if len(src.info(n).shape) == 2 and
                (parse_name(n).layer is not None and parse_name(n).layer < args.baseline_layers
                 or (args.baseline_embed and parse_name(n).layer is None))]
        for n in todo:
            t_ours = ckptprobe_one(src, n)
            t0 = time.perf_counter()
            w = bf16_bits_to_float32(src.get_array(n))
            numpy_safe_mask(w, default_rank(w.shape), ALPHA)
            pairs[n] = (t_ours, time.perf_counter() - t0)
            print(f"  {n} {src.info(n).shape}: ckptprobe {t_ours:.2f} s, numpy {pairs[n][1]:.1f} s", flush=True)
        # Per model, from the side-by-side pairs only (one consistent load); without --baseline-embed both
        # sides count the embedding at ckptprobe's full-build time, which flatters the baseline.
        side = dict(pairs)
        if not args.baseline_embed:
            side |= {n: (t, t) for n, t in ours.items() if parse_name(n).layer is None}
        o_e, o_l, o_m = project({n: o for n, (o, _) in side.items()})
        b_e, b_l, b_m = project({n: b for n, (_, b) in side.items()})
        print(f"\nckptprobe per model (Qwen2.5-1.5B, {LAYERS_1_5B} layers, projected from the build): {o_model:.0f} s")
        print(f"side by side, per layer: ckptprobe {o_l:.2f} s vs numpy {b_l:.1f} s: {b_l / o_l:.1f}x")
        if args.baseline_embed:
            print(f"side by side, embedding: ckptprobe {o_e:.1f} s vs numpy {b_e:.1f} s: {b_e / o_e:.1f}x")
        print(f"side by side, per model (projected): ckptprobe {o_m:.0f} s vs numpy {b_m:.0f} s: {b_m / o_m:.1f}x"
              + ("" if args.baseline_embed else " (embedding not timed for numpy: counted at ckptprobe's time)"))

if __name__ == "__main__":
    main()
