"""Synthetic checkpoints with Qwen2.5-1.5B shapes, for the benchmarks.

Qwen2.5-1.5B: hidden 1536, intermediate 8960, 12 query / 2 key-value heads of 128,
vocabulary 151936, 28 layers, tied embeddings. `layers` defaults to 14, which makes
a ~1.5 GB bf16 file (the full 28 layers are ~3.1 GB): nine such files still fit in
this machine's page cache, so benchmarks measure compute, not the disk.
`scan_median` is the in-process timing the sparsity and consensus benchmarks share.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from ckptprobe.analysis.bf16 import float32_to_bf16_bits
from ckptprobe.io.writer import write_safetensors

HIDDEN, INTER, KV, VOCAB = 1536, 8960, 256, 151936


def scan_median(call: Callable[[], object], repeats: int, compiled: bool = True) -> float:
    """Median seconds of `call()` in this process: a scan without start-up. `compiled=False` takes the
    numpy path, as an install without a C compiler does."""
    from ckptprobe.analysis import kernels

    kept, times = kernels.compiled, []
    kernels.compiled = kept if compiled else None
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
    finally:
        kernels.compiled = kept
    return statistics.median(times)


def qwen_shapes(layers: int = 14) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": (HIDDEN,),
            p + "self_attn.k_proj.weight": (KV, HIDDEN), p + "self_attn.k_proj.bias": (KV,),
            p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.v_proj.bias": (KV,),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def base_tensor(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """bf16 bits of N(0, 0.02^2) weights (norm weights: around 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    if len(shape) == 1:
        x += 1
    return float32_to_bf16_bits(x)


def one_ulp_apart(bits: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A copy where `fraction` of the entries (chosen at random) moved one bf16 ULP away from zero."""
    rng = np.random.default_rng(seed)
    out = bits.copy()
    out[rng.random(bits.shape, dtype=np.float32) < fraction] += 1
    return out


def write_pair(base_path, ft_paths, layers: int = 14, fraction: float = 0.4) -> None:
    """Write a base and one fine-tune per path in `ft_paths`, each with `fraction` of entries changed."""
    shapes = qwen_shapes(layers)
    base = {n: ("BF16", base_tensor(s, i)) for i, (n, s) in enumerate(shapes.items())}
    write_safetensors(base_path, base)
    for r, path in enumerate(ft_paths):
        ft = {n: ("BF16", one_ulp_apart(bits, fraction, 1000 * (r + 1) + i))
              for i, (n, (_, bits)) in enumerate(base.items())}
        write_safetensors(path, ft)
        del ft
