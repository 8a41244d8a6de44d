"""Numeric helpers for low-precision storage formats, in numpy (no torch import).

numpy has no bfloat16, so BF16 tensors travel as their raw uint16 bits. A bf16 value
is the top 16 bits of the float32 with the same value, so widening is a shift and
narrowing is a rounding of the low 16 bits.
"""

from __future__ import annotations

import numpy as np

# The 8-bit float formats, decoded once into lookup tables of all 256 codes.
_codes = np.arange(256, dtype=np.int64)


def _fp8_table(exp_bits: int, man_bits: int, bias: int, ieee_specials: bool) -> np.ndarray:
    sign = np.where(_codes & 0x80, -1.0, 1.0)
    e = (_codes >> man_bits) & ((1 << exp_bits) - 1)
    m = _codes & ((1 << man_bits) - 1)
    normal = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
    subnormal = (m / (1 << man_bits)) * 2.0 ** (1 - bias)
    values = sign * np.where(e == 0, subnormal, normal)
    if ieee_specials:  # E5M2: exponent all ones is inf (mantissa 0) or NaN
        top = e == (1 << exp_bits) - 1
        values = np.where(top & (m == 0), sign * np.inf, np.where(top, np.nan, values))
    else:  # E4M3 "fn": no infinities, only S.1111.111 is NaN
        values = np.where((_codes & 0x7F) == 0x7F, np.nan, values)
    return values.astype(np.float32)


_F8_TABLES = {"F8_E4M3": _fp8_table(4, 3, 7, False), "F8_E5M2": _fp8_table(5, 2, 15, True)}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits, any shape -> float32 of the same shape (exact)."""
    out = bits.astype(np.uint32)
    out <<= 16  # in place: an embedding's float32 copy is made once, not twice
    return out.view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32, any shape -> uint16 bf16 bits, rounded to nearest, ties to even (as torch does).

    NaNs stay NaN (quiet); values that round past the largest bf16 become inf.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> 16) | np.uint32(0x0040), rounded).astype(np.uint16)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A storage array of safetensors dtype `dtype` -> float32 values (exact for 16-bit and 8-bit floats)."""
    if dtype == "BF16":
        return bf16_bits_to_float32(raw)
    if dtype in _F8_TABLES:
        return _F8_TABLES[dtype][raw]
    return raw.astype(np.float32)


def to_bf16_bits(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A storage array -> the bits it would have if stored as bf16 (identity for BF16)."""
    return raw if dtype == "BF16" else float32_to_bf16_bits(to_float32(raw, dtype))


def to_torch(raw: np.ndarray, dtype: str):
    """A storage array -> a torch tensor of the checkpoint's own dtype (bf16 stays bf16; shares memory)."""
    import torch

    if not raw.flags.writeable:  # memory-mapped checkpoint data: torch wants memory it may write
        raw = raw.copy()
    if dtype == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    if dtype in _F8_TABLES:
        return torch.from_numpy(raw).view(torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2)
    return torch.from_numpy(raw)


def float64_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64, any shape -> uint16 bf16 bits, correctly rounded (to nearest, ties to even).

    Going through float32 with numpy's (or torch's) rounding would round twice, which is
    off by one ULP when the first rounding lands on a bf16 tie. Instead the value is first
    rounded to float32 *to odd* (truncate, then set the last bit if anything was lost):
    with 16 spare bits that keeps every tie visible, so the second rounding is exact.
    """
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore"):
        f = x.astype(np.float32)  # nearest; fix it to truncation, toward zero
    f = np.where(np.abs(f.astype(np.float64)) > np.abs(x), np.nextafter(f, np.float32(0)), f)
    u = np.ascontiguousarray(f).view(np.uint32)
    inexact = (f.astype(np.float64) != x) & np.isfinite(x)
    return float32_to_bf16_bits((u | inexact.astype(np.uint32)).view(np.float32))
