"""The layout corpus itself: each family is saved the way it is published, and the planted
RL-like change is exactly what the files hold (checked on raw bits, read with safetensors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from corpus import FP8_BLOCK, LAYOUTS, SCALE_SUFFIX
from safetensors import safe_open


def load(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out |= {n: f.get_tensor(n) for n in f.keys()}
    return out


def raw_bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's stored bits as unsigned integers (independent of any float decoding)."""
    if not t.is_floating_point():
        return t.numpy()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def changed_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    return int(np.count_nonzero(raw_bits(a) != raw_bits(b)))


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_is_sharded_and_variants_share_it(corpus, name):
    layout = corpus[name]
    index = json.loads((layout.base / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 2
    base, rl, sft = load(layout.base), load(layout.rl), load(layout.sft)
    assert set(base) == set(index) == set(rl) == set(sft)
    for n, t in base.items():
        assert t.shape == rl[n].shape == sft[n].shape and t.dtype == rl[n].dtype == sft[n].dtype, n
    # rl: exactly the planted entries differ (bitwise); sft: every floating matrix differs
    assert {n: changed_bits(base[n], rl[n]) for n in base} == {n: layout.rl_changed.get(n, 0) for n in base}
    assert all(changed_bits(base[n], sft[n]) for n, t in base.items()
               if t.is_floating_point() and t.ndim >= 2 and t.numel() > 64 and not n.endswith(SCALE_SUFFIX))
    if layout.experts:
        last = f".experts.{layout.experts - 1}."
        assert not any(k for n, k in layout.rl_changed.items() if last in n)
        stacks = [n for n in base if ".experts." in n and not any(f".experts.{e}." in n for e in range(layout.experts))]
        assert any(k for n, k in layout.rl_changed.items() if ".experts.0." in n) or stacks
        for n in (n for n in stacks if base[n].ndim == 3):  # fused (E, out, in) stacks: the last slice is untouched
            assert changed_bits(base[n][-1], rl[n][-1]) == 0 and changed_bits(base[n][:-1], rl[n][:-1]) > 0, n


def test_family_quirks(corpus):
    names = {n: set(load(corpus[n].base)) for n in ("qwen2", "gemma", "llama", "phi3", "qwen3_moe", "mixtral",
                                                     "qwen3_vl", "gpt_oss")}
    assert "lm_head.weight" not in names["qwen2"] | names["gemma"] and "lm_head.weight" in names["llama"]
    assert "model.layers.1.self_attn.qkv_proj.weight" in names["phi3"]
    assert "model.layers.1.mlp.gate_up_proj.weight" in names["phi3"]
    # transformers >= 5 holds experts fused in memory but saves them per expert
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in names["qwen3_moe"]
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in names["mixtral"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in names["gpt_oss"]  # fused: (E, hidden, 2 * intermediate)
    assert "model.language_model.layers.1.self_attn.q_proj.weight" in names["qwen3_vl"]
    assert "model.visual.blocks.1.attn.qkv.weight" in names["qwen3_vl"]
    gpt2 = load(corpus["gpt2"].base)
    assert gpt2["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D: (in, out)
    bert = load(corpus["bert"].base)
    assert bert["embeddings.position_ids"].dtype == torch.int64


def test_deepseek_fp8_blocks(corpus):
    t = load(corpus["deepseek_v3_fp8"].base)
    fp8 = [n for n, x in t.items() if x.dtype == torch.float8_e4m3fn]
    assert len(fp8) > 20 and "model.layers.1.mlp.gate.weight" not in fp8
    for n in fp8:
        rows, cols = t[n].shape
        assert t[n + SCALE_SUFFIX].shape == (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
        assert t[n + SCALE_SUFFIX].dtype == torch.float32
    assert any(x.shape[0] % FP8_BLOCK and x.shape[0] > FP8_BLOCK for n, x in t.items() if n in fp8)
