"""FP8 weights with block scales, as DeepSeek-V3 publishes them, read as float32 matrices.

Such a checkpoint stores every linear weight `x.weight` as `F8_E4M3` of shape (R, C), plus
a float32 `x.weight_scale_inv` of shape (ceil(R/b0), ceil(C/b1)) holding one factor per
b0 x b1 block (`quantization_config.weight_block_size`, [128, 128] for DeepSeek-V3). The
weight is `fp8 * weight_scale_inv`, the block's factor applied to each of its entries;
edge blocks are partial when R or C is not a multiple of the block. (The name says
"inverse" because it is the inverse of the scale the values were divided by.)

Scales are not weights: they are never analysed or put into masks as matrices. A weight's
bits can stay put while its block scale moves (and the other way round), so a bitwise
update count reads the stored bits of both tensors, while spectrum, principal and masks
work on the dequantized matrix.
"""

from __future__ import annotations

import numpy as np

from ckptprobe.analysis.bf16 import to_float32
from ckptprobe.errors import InvalidCheckpointError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def scale_name(name: str) -> str:
    """`x.weight` -> `x.weight_scale_inv`, the name of its block scales."""
    return name + SCALE_SUFFIX


def block_scaled(source, name: str) -> bool:
    """Whether `name` is an FP8 weight with block scales in `source` (anything with `info()`)."""
    if source.info(name).dtype not in FP8_DTYPES:
        return False
    try:
        source.info(scale_name(name))
    except KeyError:
        return False
    return True


def block_size(shape: tuple[int, ...], scale_shape: tuple[int, ...], what: str) -> tuple[int, int]:
    """The (b0, b1) block of a (..., R, C) weight whose scales are (..., S0, S1).

    The block is not stored in the file. Along each axis we take the power of two b with
    ceil(R / b) == S0: there is exactly one when S0 >= 2 (128 for every published
    checkpoint); S0 == 1 means one block spans the axis. No such power: the file is not
    block-scaled as we know it, and we say so rather than guess.
    """
    if len(scale_shape) != len(shape) or len(shape) < 2 or scale_shape[:-2] != shape[:-2]:
        raise InvalidCheckpointError(f"{what}: scale shape {list(scale_shape)} does not match weight shape {list(shape)}")
    block = []
    for n, s in zip(shape[-2:], scale_shape[-2:]):
        if s == 1 and n >= 1:
            block.append(max(n, 1))
            continue
        fits = [1 << k for k in range(31) if s >= 1 and -(-n // (1 << k)) == s]
        if not fits:
            raise InvalidCheckpointError(
                f"{what}: scale shape {list(scale_shape)} is not one factor per block of a {list(shape)} weight "
                "for any power-of-two block size")
        block.append(fits[0])
    return block[0], block[1]


def dequantize(values: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float32 (..., R, C) values and float32 (..., ceil(R/b0), ceil(C/b1)) scales -> float32 (..., R, C).

    Entry [i, j] is multiplied by scale[i // b0, j // b1]. Done one row of blocks at a time,
    so the extra memory is one expanded row of scales, not a second full matrix.
    """
    b0, b1 = block
    out = np.empty(values.shape, np.float32)
    rows, cols = values.shape[-2:]
    for i in range(scale.shape[-2]):
        r = slice(i * b0, min((i + 1) * b0, rows))
        factors = np.repeat(scale[..., i, :], b1, axis=-1)[..., None, :cols]  # (..., 1, C)
        np.multiply(values[..., r, :], factors, out=out[..., r, :])
    return out


def _read(source, name: str, index: int | None) -> np.ndarray:
    """A whole tensor, or only its `index`-th slice along the first axis (one range read)."""
    shape = source.info(name).shape
    if index is None:
        return source.get_array(name)
    n = int(np.prod(shape[1:], dtype=np.int64))
    return source.read(name, index * n, (index + 1) * n).reshape(shape[1:])


def _scales(source, name: str) -> tuple[np.ndarray, tuple[int, int]]:
    """The float32 block scales of weight `name` and the block size they imply."""
    info, sinfo = source.info(name), source.info(scale_name(name))
    what = f"{getattr(source, 'ref', '?')}: {scale_name(name)}"
    if sinfo.dtype not in ("F32", "BF16", "F16"):
        raise InvalidCheckpointError(f"{what}: block scales are {sinfo.dtype}, expected a float type")
    block = block_size(info.shape, sinfo.shape, what)
    return to_float32(source.get_array(scale_name(name)), sinfo.dtype), block


def read_dequantized(source, name: str, index: int | None = None) -> np.ndarray:
    """An FP8 weight with block scales in `source` -> its float32 values, shaped as stored;
    with `index`, only matrix `index` of an (E, R, C) stack (whose scales are (E, S0, S1))."""
    scale, block = _scales(source, name)
    values = _read(source, name, index)
    return dequantize(to_float32(values, source.info(name).dtype), scale if index is None else scale[index], block)


def read_dequantized_range(source, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Elements [start, stop) of a flattened FP8 weight with block scales -> float32 values."""
    info = source.info(name)
    scale, (b0, b1) = _scales(source, name)
    stop = info.numel if stop is None else min(stop, info.numel)
    rows, cols = info.shape[-2:]
    idx = np.arange(start, max(start, stop), dtype=np.int64)
    mat, within = np.divmod(idx, rows * cols)  # which matrix of a stack, and where in it
    factors = scale.reshape(-1, *scale.shape[-2:])[mat, within // cols // b0, within % cols // b1]
    return to_float32(source.read(name, start, stop), info.dtype) * factors
