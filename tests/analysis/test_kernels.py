"""The compiled loops (`_kernels.c`) against numpy references, on every bit pattern that matters."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest

from ckptprobe.analysis import kernels

EXPONENT = {"BF16": 0x7F80, "F16": 0x7C00}
POPCOUNT = np.array([bin(v).count("1") for v in range(256)], np.uint8)


def test_kernels_are_built_where_a_compiler_is():
    """A silent build failure would leave every user on the slow path: where a C compiler and
    Python's headers are at hand, the module must be there."""
    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    if shutil.which("cc") and headers:
        assert kernels.compiled is not None
    else:
        pytest.skip("no C compiler or Python headers here: the package runs on its numpy path")


def test_a_module_from_an_older_build_is_not_used(monkeypatch):
    """An editable install keeps its compiled module when the C source changes: one whose VERSION
    differs from kernels.VERSION is set aside, and the numpy path runs."""
    import ckptprobe.analysis

    stale = types.ModuleType("ckptprobe.analysis._kernels")
    stale.VERSION = kernels.VERSION + 1
    monkeypatch.setattr(ckptprobe.analysis, "_kernels", stale, raising=False)
    monkeypatch.setitem(sys.modules, "ckptprobe.analysis._kernels", stale)
    try:
        assert importlib.reload(kernels).compiled is None
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)
    assert kernels.compiled is None or kernels.compiled.VERSION == kernels.VERSION


@pytest.fixture
def K():
    if kernels.compiled is None:
        pytest.skip("ckptprobe was installed without its compiled loops (no C compiler)")
    return kernels.compiled


def values(bits: np.ndarray, dtype: str) -> np.ndarray:
    """16-bit float bits -> float32 values (exact), the reference's view of them."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def reference(x: np.ndarray, y: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(changed, nonfinite) from the values: a pair with an inf/NaN is non-finite; otherwise it
    changed where the values differ (+0 == -0) -- for finite values, exactly where the bits do."""
    a, b = values(x, dtype), values(y, dtype)
    nonfinite = ~(np.isfinite(a) & np.isfinite(b))
    return (a != b) & ~nonfinite, nonfinite


def pairs(dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every 16-bit pattern as x, against itself, its sign flip, its neighbours, a random pattern
    and the specials (+-0, +-inf, NaN); then the same in a random order, so specials fall in
    every tile of the loops (4,096 entries)."""
    rng = np.random.default_rng(seed)
    x = np.arange(1 << 16, dtype=np.uint16)
    inf = EXPONENT[dtype]
    ys = [x, x ^ 0x8000, x + 1, x - 1, rng.integers(0, 1 << 16, x.size, dtype=np.uint16),
          rng.choice(np.array([0, 0x8000, inf, inf | 0x8000, inf | 1, 0x3C00], np.uint16), x.size)]
    xs = np.concatenate([x] * len(ys))
    y = np.concatenate(ys).astype(np.uint16)
    order = rng.permutation(xs.size)
    return np.concatenate([xs, xs[order]]), np.concatenate([y, y[order]])


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_count16_is_the_rule_on_every_bit_pattern(K, dtype):
    x, y = pairs(dtype, 0)
    changed, nonfinite = reference(x, y, dtype)
    assert K.count16(x, y, EXPONENT[dtype]) == (int(changed.sum()), int(nonfinite.sum()))
    # Lengths and offsets that cut the tiles anywhere; clean stretches between the specials.
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 4095, 4096, 4097, 3 * 4096 + 5):
        lo = int(rng.integers(0, x.size - n))
        c, f = reference(x[lo:lo + n], y[lo:lo + n], dtype)
        assert K.count16(x[lo:lo + n], y[lo:lo + n], EXPONENT[dtype]) == (int(c.sum()), int(f.sum()))


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("special", ["inf", "-inf", "nan", "-0"])
@pytest.mark.parametrize("at", [0, 4095, 4096, 9000])
def test_one_special_value_in_clean_weights(K, dtype, special, at):
    """A lone inf (the smallest magnitude the tile check must catch), NaN or -0 among small
    weights, on either side, at a tile's first or last entry or inside one."""
    rng = np.random.default_rng(at)
    x = rng.integers(0, 0x3C00, 9001, dtype=np.uint16)  # below 1.0 in bf16 and fp16
    y = np.where(rng.random(x.size) < 0.3, x + 1, x).astype(np.uint16)
    x[at] = 0
    bits = {"inf": EXPONENT[dtype], "-inf": EXPONENT[dtype] | 0x8000, "nan": EXPONENT[dtype] | 1, "-0": 0x8000}
    for a, b in ((x, y.copy()), (y.copy(), x)):
        b[at] = bits[special]
        changed, nonfinite = reference(a, b, dtype)
        assert K.count16(a, b, EXPONENT[dtype]) == (int(changed.sum()), int(nonfinite.sum()))
        codes = np.zeros(a.size, np.uint8)
        assert K.mark16(a, b, EXPONENT[dtype], 1, codes) == int(nonfinite.sum())
        np.testing.assert_array_equal(codes, changed.astype(np.uint8) << 1)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("bit", [0, 5, 7])
def test_mark16_writes_one_bit_and_keeps_the_others(K, dtype, bit):
    x, y = pairs(dtype, 2)
    changed, nonfinite = reference(x, y, dtype)
    codes = np.random.default_rng(3).integers(0, 256, x.size, dtype=np.uint8)
    before = codes.copy()
    assert K.mark16(x, y, EXPONENT[dtype], bit, codes) == int(nonfinite.sum())
    np.testing.assert_array_equal(codes, before & ~np.uint8(1 << bit) | changed.astype(np.uint8) << bit)


@pytest.mark.parametrize("offsets", [(1, 0), (0, 3), (1, 1), (5, 2)])
def test_bits_at_odd_addresses(K, offsets):
    """A file may hold a bf16 tensor at an odd byte offset (after an odd-sized U8 tensor), and a
    read puts it at the file's offset within a page: the loops take 16-bit values at any address."""
    x, y = pairs("BF16", 4)
    changed, nonfinite = reference(x, y, "BF16")
    moved = []
    for bits, off in zip((x, y), offsets):
        raw = np.zeros(bits.nbytes + 8, np.uint8)
        moved.append(raw[off:off + bits.nbytes].view(np.uint16))
        moved[-1][:] = bits
    assert K.count16(*moved, EXPONENT["BF16"]) == (int(changed.sum()), int(nonfinite.sum()))
    codes = np.zeros(x.size + 1, np.uint8)[1:]
    assert K.mark16(*moved, EXPONENT["BF16"], 2, codes) == int(nonfinite.sum())
    np.testing.assert_array_equal(codes, changed.astype(np.uint8) << 2)


@pytest.mark.parametrize("rows,cols", [(1, 1), (37, 3), (9000, 2), (5, 8191), (3, 8192), (2, 10001)])
def test_tally8_against_numpy(K, rows, cols):
    """The histogram, per-entry counts and row/column sums; 9,000 rows cross the 16-bit column
    sums' flush (every 8,191 rows) with every count at its maximum, 8192 columns take the wide sums."""
    rng = np.random.default_rng(rows * cols)
    codes = rng.integers(0, 256, rows * cols, dtype=np.uint8)
    codes[: cols * min(rows, 8500)] = 0xFF
    hist, counts = np.arange(256, dtype=np.int64), np.empty(codes.size, np.uint8)
    row_sums, col_sums = np.full(rows, -1, np.int64), np.arange(cols, dtype=np.int64)
    K.tally8(codes, cols, hist, counts, row_sums, col_sums)
    np.testing.assert_array_equal(hist, np.arange(256) + np.bincount(codes, minlength=256))
    np.testing.assert_array_equal(counts, POPCOUNT[codes])
    per_entry = POPCOUNT[codes].astype(np.int64).reshape(rows, cols)
    np.testing.assert_array_equal(row_sums, per_entry.sum(axis=1))
    np.testing.assert_array_equal(col_sums, np.arange(cols) + per_entry.sum(axis=0))
    hist2 = np.zeros(256, np.int64)
    K.tally8(codes, cols, hist2, None, None, None)  # the histogram alone
    np.testing.assert_array_equal(hist2, np.bincount(codes, minlength=256))


def test_bad_buffers_are_refused(K):
    x = np.zeros(100, np.uint16)
    with pytest.raises(ValueError, match="y: 100 bytes, 200 needed"):
        K.count16(x, np.zeros(50, np.uint16), 0x7F80)
    with pytest.raises(ValueError, match="codes"):
        K.mark16(x, x, 0x7F80, 0, np.zeros(99, np.uint8))
    with pytest.raises(ValueError, match="bit"):
        K.mark16(x, x, 0x7F80, 8, np.zeros(100, np.uint8))
    with pytest.raises((BufferError, TypeError)):  # a read-only buffer cannot take the codes
        K.mark16(x, x, 0x7F80, 0, bytes(100))
    with pytest.raises(ValueError, match="whole rows"):
        K.tally8(np.zeros(10, np.uint8), 3, np.zeros(256, np.int64), np.zeros(10, np.uint8),
                 np.zeros(4, np.int64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="hist"):
        K.tally8(np.zeros(10, np.uint8), 1, np.zeros(255, np.int64), None, None, None)
    with pytest.raises(ValueError, match="contiguous"):
        K.count16(x[::2], x[::2], 0x7F80)


@pytest.fixture
def F(K):
    if not hasattr(K, "mark16_files"):
        pytest.skip("no pread on this platform: the loops that read files are not built")
    return K


def files_of(tmp_path: Path, arrays: list[np.ndarray], heads: list[int]) -> list[tuple[int, int]]:
    """Each array written to its own file after `heads[i]` bytes of filler; (fd, byte offset) pairs."""
    out = []
    for i, (a, head) in enumerate(zip(arrays, heads)):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"\x5a" * head + a.tobytes() + b"\xa5" * 3)
        out.append((os.open(path, os.O_RDONLY), head))
    return out


@pytest.mark.parametrize("heads", [(0, 0), (1, 4096), (4097, 3), (8, 12345)])
@pytest.mark.parametrize("buf_bytes", [2 * (4096 + 2), 2 * (4096 + 2 * 1000 + 1), 1 << 20])
def test_count16_files_reads_and_counts_in_chunks(F, tmp_path, heads, buf_bytes):
    """Reading the files itself, chunk by chunk (the buffer decides the chunk: 1 entry, 1000, or
    all), from any offset: the same counts as the rule on the whole arrays, and as count16."""
    x, y = pairs("BF16", 5)
    x, y = x[:20_000], y[:20_000]
    files = files_of(tmp_path, [x, y], list(heads))
    try:
        changed, nonfinite = reference(x, y, "BF16")
        buf = np.zeros(buf_bytes + 1, np.uint8)[1:]  # at an odd address
        assert F.count16_files(files, x.size, EXPONENT["BF16"], buf) == (int(changed.sum()), int(nonfinite.sum()))
        (fa, oa), (fb, ob) = files
        c, f = reference(x[777:], y[777:], "BF16")
        assert F.count16_files([(fa, oa + 2 * 777), (fb, ob + 2 * 777)], x.size - 777, EXPONENT["BF16"], buf) == \
            (int(c.sum()), int(f.sum()))
        assert F.count16_files(files, 0, EXPONENT["BF16"], buf) == (0, 0)
    finally:
        for fd, _ in files:
            os.close(fd)


@pytest.mark.parametrize("runs", [1, 3, 8])
def test_mark16_files_sets_each_runs_bit(F, tmp_path, runs):
    """Base and runs at different offsets of different files: bit k of each code is run k's mark16,
    whatever the codes held before, and the non-finite counts come back per run."""
    rng = np.random.default_rng(runs)
    x, _ = pairs("BF16", 6)
    x = x[:50_001]
    ys = [pairs("BF16", 7 + k)[1][:x.size] for k in range(runs)]
    files = files_of(tmp_path, [x, *ys], [int(h) for h in rng.integers(0, 9000, runs + 1)])
    try:
        codes = rng.integers(0, 256, x.size + 5, dtype=np.uint8)
        tail = codes[x.size:].copy()
        buf = np.empty(2 * (2 * x.size + 4096), np.uint8)
        nonfinite = F.mark16_files(files, x.size, EXPONENT["BF16"], buf, codes)
        expected = np.zeros(x.size, np.uint8)
        for k, y in enumerate(ys):
            changed, nf = reference(x, y, "BF16")
            expected |= changed.astype(np.uint8) << k
            assert nonfinite[k] == int(nf.sum())
        assert len(nonfinite) == runs
        np.testing.assert_array_equal(codes[:x.size], expected)
        np.testing.assert_array_equal(codes[x.size:], tail)  # nothing past n
    finally:
        for fd, _ in files:
            os.close(fd)


def test_file_loops_name_the_source_that_failed(F, tmp_path):
    """A file shorter than the range asked (it shrank after its header was read), or a descriptor
    that cannot be read: OSError whose `filename` is the index of that source."""
    x = np.arange(1000, dtype=np.uint16)
    files = files_of(tmp_path, [x, x, x], [0, 0, 0])
    bad = os.open(tmp_path, os.O_RDONLY)  # a folder: reading it fails with EISDIR
    try:
        buf = np.empty(2 * (2 * 2000 + 4096), np.uint8)
        codes = np.empty(2000, np.uint8)
        with pytest.raises(OSError) as e:
            F.mark16_files([files[0], files[1], (files[2][0], 1000)], 1000, 0x7F80, buf, codes)
        assert e.value.filename == 2 and e.value.errno == getattr(errno, "ENODATA", errno.EIO)
        with pytest.raises(OSError) as e:
            F.mark16_files([files[0], (bad, 0)], 10, 0x7F80, buf, codes)
        assert e.value.filename == 1 and e.value.errno == errno.EISDIR
        with pytest.raises(OSError) as e:
            F.count16_files([(files[0][0], 5), files[1]], 1000, 0x7F80, buf)
        assert e.value.filename == 0
        with pytest.raises(ValueError, match="sources"):
            F.mark16_files([files[0]], 10, 0x7F80, buf, codes)
        with pytest.raises(ValueError, match="sources"):
            F.mark16_files([files[0]] * 10, 10, 0x7F80, buf, codes)
        with pytest.raises(ValueError, match="buf"):
            F.mark16_files(files, 1000, 0x7F80, buf[:4000], codes)
        with pytest.raises(ValueError, match="codes"):
            F.mark16_files(files, 1000, 0x7F80, buf, codes[:999])
    finally:
        for fd in [bad, *(fd for fd, _ in files)]:
            os.close(fd)


F32_SPECIALS = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC00001, 0x00000001,
                         0x807FFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x3F808000, 0x3F818000, 0x3F807FFF],
                        np.uint32)  # +-0, +-inf, NaNs, denormals, the largest float32, bf16 rounding ties


def rule(x: np.ndarray, y: np.ndarray, dtype_x: str, dtype_y: str, mode) -> tuple[np.ndarray, np.ndarray]:
    """`update_mask` on its numpy passes, the compiled loops set aside: the reference."""
    from ckptprobe.analysis.update import update_mask

    kept, kernels.compiled = kernels.compiled, None
    try:
        return update_mask(x, y, dtype_x, dtype_y, mode)
    finally:
        kernels.compiled = kept


def f32_pairs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 bits: random patterns and the specials as x, against themselves, their sign flip,
    their neighbours, random patterns and the specials."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.integers(0, 1 << 32, 40_000, dtype=np.uint32), np.repeat(F32_SPECIALS, 200)])
    x = rng.permutation(x)
    ys = [x, x ^ 0x80000000, x + 1, x - 1, rng.integers(0, 1 << 32, x.size, dtype=np.uint32),
          rng.choice(F32_SPECIALS, x.size)]
    return np.concatenate([x] * len(ys)), np.concatenate(ys).astype(np.uint32)


def test_count32_is_the_rule_on_float32_bits(K):
    from ckptprobe.analysis.update import CompareMode

    x, y = f32_pairs(13)
    changed, nonfinite = rule(x.view(np.float32), y.view(np.float32), "F32", "F32", CompareMode.bitwise)
    assert K.count32(x, y) == (int(changed.sum()), int(nonfinite.sum()))
    for n in (0, 1, 4095, 4097):  # tiles cut anywhere
        c, f = rule(x[:n].view(np.float32), y[:n].view(np.float32), "F32", "F32", CompareMode.bitwise)
        assert K.count32(x[:n], y[:n]) == (int(c.sum()), int(f.sum()))


def test_count_bf16_f32_rounds_as_bf16_mode_does(K):
    """Every bf16 pattern against float32 values that round to it, to a neighbour (ties both ways),
    past the largest bf16 (to inf), NaNs and random values: the counts of `update_mask` in bf16 mode."""
    from ckptprobe.analysis.update import CompareMode

    rng = np.random.default_rng(14)
    x = np.arange(1 << 16, dtype=np.uint16)
    wide = x.astype(np.uint32) << 16
    ys = [wide, wide | 0x7FFF, wide | 0x8000, wide | 0x8001, wide - 0x8000, rng.integers(0, 1 << 32, x.size,
          dtype=np.uint32), rng.choice(F32_SPECIALS, x.size)]
    xs = np.concatenate([x] * len(ys))
    y = np.concatenate(ys).astype(np.uint32)
    changed, nonfinite = rule(xs, y.view(np.float32), "BF16", "F32", CompareMode.bf16)
    assert K.count_bf16_f32(xs, y) == (int(changed.sum()), int(nonfinite.sum()))
    order = rng.permutation(xs.size)  # specials in every tile
    assert K.count_bf16_f32(xs[order], y[order]) == (int(changed.sum()), int(nonfinite.sum()))
    with pytest.raises(ValueError, match="y"):
        K.count_bf16_f32(xs, y[:-1])


@pytest.mark.parametrize("bit", [0, 6])
def test_float32_marks_set_the_counts_bits(K, bit):
    """mark32 and mark_bf16_f32 set bit `bit` where count32 and count_bf16_f32 count a change: the
    masks of `update_mask` (bitwise float32; bf16 mode), other bits kept."""
    from ckptprobe.analysis.update import CompareMode

    rng = np.random.default_rng(15)
    x, y = f32_pairs(16)
    codes = rng.integers(0, 256, x.size, dtype=np.uint8)
    before = codes.copy()
    changed, nonfinite = rule(x.view(np.float32), y.view(np.float32), "F32", "F32", CompareMode.bitwise)
    assert K.mark32(x, y, bit, codes) == int(nonfinite.sum())
    np.testing.assert_array_equal(codes, before & ~np.uint8(1 << bit) | changed.astype(np.uint8) << bit)
    half = (x >> 16).astype(np.uint16)  # bf16 bits near the float32 values, and their neighbours
    half[::3] += 1
    codes = before.copy()
    changed, nonfinite = rule(half, y.view(np.float32), "BF16", "F32", CompareMode.bf16)
    assert K.mark_bf16_f32(half, y, bit, codes) == int(nonfinite.sum())
    np.testing.assert_array_equal(codes, before & ~np.uint8(1 << bit) | changed.astype(np.uint8) << bit)
    with pytest.raises(ValueError, match="bit"):
        K.mark32(x, y, 8, codes)
    with pytest.raises(ValueError, match="codes"):
        K.mark_bf16_f32(half, y, 0, codes[:-1])


NORMS_KINDS = {"b": (np.uint16, lambda u: values(u, "BF16")), "e": (np.uint16, lambda u: u.view(np.float16)),
               "f": (np.uint32, lambda u: u.view(np.float32))}


def test_norms_files_widen_every_16_bit_pattern(F, tmp_path):
    """Every bf16 and fp16 bit pattern (subnormals, +-0, +-inf, NaNs), one entry a call, read as base
    and checkpoint: ||W||^2 is exactly its value squared in float64, as numpy widens it, and the
    distances are (v - v)^2 (0, or NaN for an inf or a NaN)."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    (fd, _), = files_of(tmp_path, [bits], [0])
    buf, out = np.empty(16 * 8 + 4160, np.uint8), np.empty(4)
    try:
        for kind, widened in (("b", values(bits, "BF16")), ("e", bits.view(np.float16))):
            with np.errstate(invalid="ignore", over="ignore"):
                v = widened.astype(np.float64)
                expected = np.stack([v * v, v * v, (v - v) ** 2, (v - v) ** 2], axis=1)
            got = np.empty_like(expected)
            for i in range(bits.size):
                F.norms_files([(fd, 2 * i), (fd, 2 * i)], kind * 2, 1, buf, out)
                got[i] = out
            np.testing.assert_array_equal(got, expected)  # NaN where numpy has NaN
    finally:
        os.close(fd)


@pytest.mark.parametrize("kinds", ["bb", "bfe", "fbfef", "eeb"])
@pytest.mark.parametrize("chunk", [8, 1000, 1 << 16])
def test_norms_files_are_drifts_sums(F, tmp_path, kinds, chunk):
    """A base and checkpoints of mixed dtypes, at odd offsets, summed a chunk at a time (fewer entries
    than the loop's 16 lanes, ragged chunks, or all at once): the float64 sums of numpy over the
    widened values."""
    rng = np.random.default_rng(len(kinds) * chunk)
    n = 12_345
    raw, vals = [], []
    for k in kinds:
        dtype, widen = NORMS_KINDS[k]
        v = (rng.standard_normal(n) * 0.02).astype(np.float32)
        bits = (v.view(np.uint32) >> 16).astype(np.uint16) if k == "b" else \
            v.astype(np.float16).view(np.uint16) if k == "e" else v.view(np.uint32)
        raw.append(bits.astype(dtype))
        vals.append(widen(bits).astype(np.float64))
    files = files_of(tmp_path, raw, [int(h) for h in rng.integers(0, 5000, len(kinds))])
    T = len(kinds) - 1
    out = np.full(3 * T + 1, np.nan)
    try:
        F.norms_files(files, kinds, n, np.empty(16 * chunk + 4160 + 3, np.uint8), out)
    finally:
        for fd, _ in files:
            os.close(fd)
    sq = [np.sum(v ** 2) for v in vals]
    to_base = [np.sum((v - vals[0]) ** 2) for v in vals[1:]]
    step = [np.sum((vals[t] - vals[t - 1]) ** 2) for t in range(1, T + 1)]
    np.testing.assert_allclose(out, sq + to_base + step, rtol=1e-12)


def test_norms_files_refuses_bad_arguments(F, tmp_path):
    files = files_of(tmp_path, [np.zeros(100, np.uint16)] * 3, [0, 0, 0])
    buf, out = np.empty(16 * 64 + 4160, np.uint8), np.empty(7)
    try:
        with pytest.raises(ValueError, match="kind"):
            F.norms_files(files, "bbx", 100, buf, out)
        with pytest.raises(ValueError, match="kind"):
            F.norms_files(files, "bb", 100, buf, out)
        with pytest.raises(ValueError, match="kind"):
            F.norms_files(files[:1], "b", 100, buf, out)
        with pytest.raises(ValueError, match="out"):
            F.norms_files(files, "bbb", 100, buf, out[:6])
        with pytest.raises(ValueError, match="buf"):
            F.norms_files(files, "bbb", 100, buf[:4160], out)
        with pytest.raises(OSError) as e:
            F.norms_files(files, "bbf", 100, buf, out)  # 400 bytes asked of a 203-byte file
        assert e.value.filename == 2
    finally:
        for fd, _ in files:
            os.close(fd)
