"""Mask files: bit packing, metadata round trip, and refusal of broken or mismatching files."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptprobe.errors import MaskFileError
from ckptprobe.io.maskfile import (MaskSet, PackedMask, check_against, fingerprint, load_masks, pack, read_masks,
                                   unpack, write_masks, write_packed)
from ckptprobe.io.writer import write_safetensors

SHAPES = {"a.weight": (3, 5), "b.weight": (8,), "c.weight": (2, 2, 2), "empty": (0, 4)}


def masks(seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.random(s) < 0.4 for n, s in SHAPES.items()}


def fps():
    return {n: f"BF16:{i:032x}" for i, n in enumerate(SHAPES)}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=0, max_size=3), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(shape, seed):
    m = np.random.default_rng(seed).random(shape) < 0.5
    packed = pack(m)
    assert packed.dtype == np.uint8 and packed.shape == ((m.size + 7) // 8,)
    assert np.array_equal(unpack(packed, tuple(shape)), m)


def test_little_bit_order_known_answer():
    m = np.zeros(10, bool)
    m[[0, 3, 9]] = True  # bits 0 and 3 of byte 0, bit 1 of byte 1
    assert pack(m).tolist() == [0b1001, 0b10]


def test_fingerprint_is_bitwise():
    x = np.arange(6, dtype=np.uint16).reshape(2, 3)
    assert fingerprint(x, "BF16") == fingerprint(x.copy(), "BF16")
    assert fingerprint(np.asfortranarray(x), "BF16") == fingerprint(x, "BF16")  # C order is hashed
    y = x.copy()
    y[1, 2] ^= 1
    assert fingerprint(y, "BF16") != fingerprint(x, "BF16")
    assert fingerprint(x, "F16").startswith("F16:") and fingerprint(x, "F16") != fingerprint(x, "BF16")


def test_round_trip_recipe_density_count(tmp_path):
    m = masks()
    write_masks(tmp_path / "m.safetensors", m, {"kind": "safe", "alpha": 0.05}, fps())
    mf = read_masks(tmp_path / "m.safetensors")
    assert mf.recipe == {"format": 1, "kind": "safe", "alpha": 0.05}
    for n, x in m.items():
        assert mf.shape(n) == x.shape
        assert np.array_equal(mf.mask(n), x)
        assert mf.count(n) == int(x.sum())
        assert mf.tensors[n]["density"] == pytest.approx(x.mean() if x.size else 0.0)
        assert mf.tensors[n]["fingerprint"] == fps()[n]


def test_packed_extra_metadata_and_bad_bits(tmp_path):
    m = np.ones((3, 3), bool)
    write_packed(tmp_path / "m.safetensors", {"w": PackedMask((3, 3), pack(m), 9, {"rank": 2})}, {}, {})
    assert read_masks(tmp_path / "m.safetensors").tensors["w"]["rank"] == 2
    with pytest.raises(ValueError, match="do not fit"):
        write_packed(tmp_path / "x.safetensors", {"w": PackedMask((5, 4), pack(m), 9)}, {}, {})


def test_count_ignores_padding_bits(tmp_path):
    bits = np.array([0xFF, 0xFF], np.uint8)  # 9 entries: the 7 padding bits of byte 1 are set
    meta = {"format": 1, "tensors": {"w": {"shape": [9], "density": 1.0, "fingerprint": None}}}
    write_safetensors(tmp_path / "m.safetensors", {"w": ("U8", bits)}, {"ckptprobe": json.dumps(meta)})
    mf = read_masks(tmp_path / "m.safetensors")
    assert mf.count("w") == 9 and mf.mask("w").all()


def test_truncated_file_is_refused(tmp_path):
    write_masks(tmp_path / "m.safetensors", masks(), {}, fps())
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-1])
    with pytest.raises(MaskFileError, match="truncated"):
        read_masks(tmp_path / "t.safetensors")
    with pytest.raises(MaskFileError, match="no such mask file"):
        read_masks(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("meta, match", [
    (None, "not a ckptprobe mask file"),
    ("[1, 2]", "not a ckptprobe mask file"),
    (json.dumps({"format": 2, "tensors": {"w": {"shape": [9]}}}), "format 2"),
    (json.dumps({"format": 1, "tensors": {"v": {"shape": [9]}}}), "name different tensors"),
    (json.dumps({"format": 1, "tensors": {"w": {"shape": [5, 4]}}}), r"expected \(3,\) U8"),
    (json.dumps({"format": 1, "tensors": {"w": {"shape": "9"}}}), "malformed"),
])
def test_inconsistent_files_are_refused(tmp_path, meta, match):
    write_safetensors(tmp_path / "m.safetensors", {"w": ("U8", np.zeros(2, np.uint8))},
                      {"ckptprobe": meta} if meta else None)
    with pytest.raises(MaskFileError, match=match):
        read_masks(tmp_path / "m.safetensors")


def test_check_against(tmp_path):
    write_masks(tmp_path / "m.safetensors", masks(), {}, fps())
    mf = read_masks(tmp_path / "m.safetensors")
    check_against(mf, SHAPES, fps())  # matches
    check_against(mf, {**SHAPES, "extra": (4,)})  # model tensors without a mask are fine
    check_against(mf, SHAPES, {"a.weight": None})  # unknown fingerprints are not checked
    with pytest.raises(MaskFileError, match=r"mask shape \(3, 5\) != model shape \(5, 3\)"):
        check_against(mf, {**SHAPES, "a.weight": (5, 3)})
    with pytest.raises(MaskFileError, match="empty: not in the model"):
        check_against(mf, {n: s for n, s in SHAPES.items() if n != "empty"})
    with pytest.raises(MaskFileError, match=r"b.weight: the model's tensor differs .* \(and 1 more\)"):
        check_against(mf, SHAPES, {**fps(), "b.weight": "BF16:00", "c.weight": "BF16:11"})


def test_load_masks_torch(tmp_path):
    m = masks()
    write_masks(tmp_path / "m.safetensors", m, {"kind": "low"}, {**fps(), "empty": None})
    loaded = load_masks(tmp_path / "m.safetensors", "cpu")
    assert isinstance(loaded, MaskSet) and set(loaded) == set(m)
    for n, x in m.items():
        assert loaded[n].dtype == torch.bool and tuple(loaded[n].shape) == x.shape
        assert np.array_equal(loaded[n].numpy(), x)
    assert loaded.recipe["kind"] == "low"
    assert loaded.fingerprints == {n: f for n, f in fps().items() if n != "empty"}
