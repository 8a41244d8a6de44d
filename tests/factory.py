"""Builders of tiny seeded checkpoints, shared by the tests (`from factory import ...`).

The tiny model is Llama-style: 2 layers, hidden 32, intermediate 64, vocab 48.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ckptprobe.analysis.bf16 import float32_to_bf16_bits
from ckptprobe.cli import main
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
    """Save float32 arrays as `dtype` (BF16, F16, F32, F64): one file, or a folder of `shards` files plus an index."""
    def stored(x):
        return float32_to_bf16_bits(x) if dtype == "BF16" else x.astype({"F16": np.float16, "F32": np.float32,
                                                                          "F64": np.float64}[dtype])

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


def one_line_error(err: str, *needles: str, hint: str | None = None) -> str:
    """Check a failed run's stderr: one `Error:` line holding every needle, at most a `Hint:` line
    (holding `hint` when given), no traceback. Returns the error line."""
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith("Error: "), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("Hint: ")), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if hint:
        assert len(lines) == 2 and hint in lines[1], err
    return lines[0]


def run_error(capsys, args, *needles, code=1, hint=None):
    """Run the CLI, expect exit `code`, nothing on stdout and a one-line error (`one_line_error`)."""
    assert main(args) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    return one_line_error(captured.err, *needles, hint=hint)
