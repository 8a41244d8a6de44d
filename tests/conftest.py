"""Tiny seeded checkpoints, written once per session as real safetensors files.

`tiny_pair` is a Llama-style model (2 layers, hidden 32, intermediate 64, vocab 48)
in bf16, as a base and a fine-tune in which a known set of entries moved by one bf16
ULP; each is saved both as one file and as a folder sharded over two files with a
`model.safetensors.index.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ckptprobe.analysis.bf16 import float32_to_bf16_bits
from ckptprobe.io.writer import write_safetensors

HIDDEN, INTER, VOCAB, LAYERS = 32, 64, 48, 2


def tiny_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights, N(0, 0.02^2) for matrices, ~1 for norms."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tiny_shapes().items():
        x = rng.standard_normal(shape).astype(np.float32) * 0.02
        out[name] = x + 1 if len(shape) == 1 else x
    return out


def save(path: Path, tensors: dict[str, np.ndarray], dtype: str = "BF16", shards: int = 1) -> Path:
    """Save float32 arrays as `dtype` (BF16, F16, F32): one file, or a folder of `shards` files plus an index."""
    def stored(x):
        return float32_to_bf16_bits(x) if dtype == "BF16" else x.astype({"F16": np.float16, "F32": np.float32}[dtype])

    items = {n: (dtype, stored(x)) for n, x in tensors.items()}
    if shards == 1:
        write_safetensors(path, items)
        return path
    path.mkdir(parents=True, exist_ok=True)
    names = list(items)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(path / fname, {n: items[n] for n in part})
        weight_map |= {n: fname for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def bump(bits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """bf16 bits with the entries in `mask` moved one ULP (away from zero)."""
    out = bits.copy()
    out[mask] += 1
    return out


@dataclass
class TinyPair:
    base: Path  # single file
    ft: Path
    base_dir: Path  # sharded folder
    ft_dir: Path
    changed: dict[str, np.ndarray]  # name -> bool mask of entries that differ


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> TinyPair:
    root = tmp_path_factory.mktemp("tiny")
    w = tiny_weights(0)
    rng = np.random.default_rng(1)
    changed = {n: rng.random(x.shape) < (0.3 if "mlp" in n else 0.1) for n, x in w.items()}
    base_bits = {n: float32_to_bf16_bits(x) for n, x in w.items()}
    ft_bits = {n: bump(b, changed[n]) for n, b in base_bits.items()}
    ft = {n: b.astype(np.uint32) << 16 for n, b in ft_bits.items()}
    ft = {n: x.view(np.float32) for n, x in ft.items()}
    base = {n: (x.astype(np.uint32) << 16).view(np.float32) for n, x in base_bits.items()}
    return TinyPair(save(root / "base.safetensors", base), save(root / "ft.safetensors", ft),
                    save(root / "base", base, shards=2), save(root / "ft", ft, shards=2), changed)
