"""FP8 block-scale dequantization against an independent float64 reference: torch decodes the
FP8 codes, and every block's factor is applied in a plain loop over blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from corpus import FP8_BLOCK, deepseek_v3_shapes, fp8_quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptprobe.errors import InvalidCheckpointError
from ckptprobe.io.fp8 import (block_scaled, block_size, dequantize, read_dequantized, read_dequantized_range,
                               scale_name)
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors


def reference(codes: np.ndarray, scale: np.ndarray, b0: int, b1: int) -> np.ndarray:
    """uint8 E4M3 codes (R, C) and scales -> float64, block by block."""
    values = torch.from_numpy(codes).view(torch.float8_e4m3fn).to(torch.float64).numpy()
    out = np.empty_like(values)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = (slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1))
            out[block] = values[block] * np.float64(scale[i, j])
    return out


def random_fp8(rng, rows, cols, block):
    w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * np.exp(rng.standard_normal((rows, 1))))
    q, s = fp8_quantize(w.float(), block)
    return q.view(torch.uint8).numpy(), s.numpy()


def decode(codes):
    return torch.from_numpy(codes).view(torch.float8_e4m3fn).to(torch.float32).numpy()


@pytest.mark.parametrize("shape", [(192, 320), (128, 128), (100, 60), (257, 129), (1, 300)])
def test_dequantize_matches_reference(shape):
    rng = np.random.default_rng(sum(shape))
    codes, scale = random_fp8(rng, *shape, FP8_BLOCK)
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    block = block_size(codes.shape, scale.shape, "w")
    got = dequantize(decode(codes), scale, block)
    assert got.dtype == np.float32 and got.shape == shape
    # fp8 (exact in float32) times a float32 scale: one rounding either way, so equal bitwise
    np.testing.assert_array_equal(got, reference(codes, scale, 128, 128).astype(np.float32))
    # and the blocks matter: a flat scale would be a different matrix
    if scale.size > 1 and np.ptp(scale) > 0:
        assert not np.array_equal(got, decode(codes) * scale.flat[0])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 70), b0=st.sampled_from([8, 16, 32]), b1=st.sampled_from([8, 16]))
def test_dequantize_any_block(rows, cols, b0, b1):
    rng = np.random.default_rng(rows * 100 + cols)
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    scale = rng.random((-(-rows // b0), -(-cols // b1))).astype(np.float32) + 0.5
    got = dequantize(decode(codes), scale, (b0, b1))
    np.testing.assert_array_equal(got, reference(codes, scale, b0, b1).astype(np.float32))


def test_stacked_experts_dequantize_per_expert():
    rng = np.random.default_rng(0)
    pairs = [random_fp8(rng, 150, 40, 128) for _ in range(3)]
    codes, scale = np.stack([c for c, _ in pairs]), np.stack([s for _, s in pairs])  # (3, 150, 40), (3, 2, 1)
    got = dequantize(decode(codes), scale, block_size(codes.shape, scale.shape, "w"))
    for e, (c, s) in enumerate(pairs):
        np.testing.assert_array_equal(got[e], reference(c, s, 128, 128).astype(np.float32))


def test_block_size_is_read_from_the_shapes():
    assert block_size((192, 320), (2, 3), "w") == (128, 128)
    assert block_size((7168, 18432), (56, 144), "w") == (128, 128)  # DeepSeek-V3's mlp.gate_proj, transposed
    assert block_size((576, 7168), (5, 56), "w") == (128, 128)  # DeepSeek-V3's kv_a_proj_with_mqa
    assert block_size((100, 60), (1, 1), "w") == (100, 60)  # one block spans the matrix
    assert block_size((192, 192), (3, 3), "w") == (64, 64)
    with pytest.raises(InvalidCheckpointError, match=r"w: scale shape \[7, 2\] is not one factor per block"):
        block_size((192, 192), (7, 2), "w")
    with pytest.raises(InvalidCheckpointError, match="does not match weight shape"):
        block_size((192, 192), (2,), "w")


def test_read_dequantized_from_the_deepseek_layout(corpus):
    layout = corpus["deepseek_v3_fp8"]
    src = open_source(str(layout.base))
    fp8 = [n for n, (_, kind) in deepseek_v3_shapes().items() if kind == "fp8"]
    assert sorted(n for n in src.keys() if block_scaled(src, n)) == sorted(fp8)
    assert not block_scaled(src, "model.layers.1.mlp.gate.weight")  # the router is bf16
    from safetensors import safe_open

    tensors = {}
    for shard in layout.base.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors |= {n: f.get_tensor(n) for n in f.keys()}
    for name in fp8:
        codes, scale = tensors[name].view(torch.uint8).numpy(), tensors[scale_name(name)].numpy()
        got = read_dequantized(src, name)
        np.testing.assert_array_equal(got, reference(codes, scale, 128, 128).astype(np.float32), err_msg=name)


def test_malformed_scales_are_one_line_errors(tmp_path):
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, {"w.weight": ("F8_E4M3", np.zeros((192, 192), np.uint8)),
                             "w.weight_scale_inv": ("F32", np.ones((5, 5), np.float32)),
                             "u.weight": ("F8_E4M3", np.zeros((4, 4), np.uint8)),
                             "u.weight_scale_inv": ("I32", np.ones((1, 1), np.int32))})
    src = open_source(str(path))
    with pytest.raises(InvalidCheckpointError, match=r"bad.safetensors: w.weight_scale_inv: scale shape \[5, 5\]"):
        read_dequantized(src, "w.weight")
    with pytest.raises(InvalidCheckpointError, match="u.weight_scale_inv: block scales are I32"):
        read_dequantized(src, "u.weight")


def test_read_one_matrix_of_a_stack(tmp_path):
    rng = np.random.default_rng(1)
    pairs = [random_fp8(rng, 150, 40, 128) for _ in range(3)]
    path = tmp_path / "stack.safetensors"
    write_safetensors(path, {"mlp.experts.down_proj": ("F8_E4M3", np.stack([c for c, _ in pairs])),
                             "mlp.experts.down_proj_scale_inv": ("F32", np.stack([s for _, s in pairs]))})
    src = open_source(str(path))
    assert block_scaled(src, "mlp.experts.down_proj") and not block_scaled(src, "mlp.experts.down_proj_scale_inv")
    whole = read_dequantized(src, "mlp.experts.down_proj")
    for e, (c, s) in enumerate(pairs):
        np.testing.assert_array_equal(read_dequantized(src, "mlp.experts.down_proj", e), whole[e])
        np.testing.assert_array_equal(whole[e], reference(c, s, 128, 128).astype(np.float32))


@pytest.mark.parametrize("start,stop", [(0, None), (0, 1), (37, 5000), (6000, 12000), (11999, 12000)])
def test_read_element_ranges(tmp_path, start, stop):
    rng = np.random.default_rng(2)
    pairs = [random_fp8(rng, 150, 40, 128) for _ in range(2)]
    path = tmp_path / "stack.safetensors"
    write_safetensors(path, {"mlp.experts.down_proj": ("F8_E4M3", np.stack([c for c, _ in pairs])),
                             "mlp.experts.down_proj_scale_inv": ("F32", np.stack([s for _, s in pairs])),
                             "w.weight": ("F8_E4M3", pairs[0][0]), "w.weight_scale_inv": ("F32", pairs[0][1])})
    src = open_source(str(path))
    flat = np.concatenate([reference(c, s, 128, 128).astype(np.float32).ravel() for c, s in pairs])
    np.testing.assert_array_equal(read_dequantized_range(src, "mlp.experts.down_proj", start, stop), flat[start:stop])
    np.testing.assert_array_equal(read_dequantized_range(src, "w.weight", start, stop), flat[:6000][start:stop])
