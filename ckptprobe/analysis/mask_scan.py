"""Update masks of several runs against one base, streamed in row blocks: the counts behind
`consensus` (R runs) and `profile` (one checkpoint at a time).

Memory is bounded by a row block, not by the model or by R: a task of the window runner
is a block of whole rows (the base's and all runs' blocks together about BLOCK_BYTES of
data), read chunk by chunk; each run's mask is bit-packed (`np.packbits`) and added into
a small per-entry counter; Jaccard intersections are popcounts of ANDed packed words.
With the compiled loops (`kernels`) and at most 8 runs, a chunk's masks are instead the
bits of one byte per entry, and every count follows from the histogram of these bytes
(`_code_block`). A tensor that is not a matrix is seen as (numel, 1): counted, with no
profiles.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Sequence

import numpy as np

from ckptprobe.analysis import kernels
from ckptprobe.analysis.choices import same_rule
from ckptprobe.analysis.consensus_results import TensorConsensus
from ckptprobe.analysis.consensus_stats import stripe_index
from ckptprobe.analysis.plan import TensorPlan
from ckptprobe.analysis.runner import buffer, forkable, opened, run_windows, scratch
from ckptprobe.analysis.update import (BELOW_TWO, DEFAULT_ATOL, DEFAULT_ETA, EXPONENT16, CompareMode, finiteness16,
                                      mark_wide, plain_bits16, update_mask)
from ckptprobe.io.sources import READ_SLACK

BLOCK_BYTES = 48 << 20  # per task, the base's and all runs' blocks together
CHUNK = 1 << 19  # entries per numpy step inside a block: each chunk is read just before use, into cache
LOOP_CHUNK = 1 << 17  # the same when the compiled loop reads the files: no call per read, so less
HEAT_SIZE = 256  # heatmaps are block-averaged to at most this many cells per side
SMALL = 4096  # entries: a one-chunk block this small takes `_small_block` (its cost is per-block overhead)


def profiled(plan: TensorPlan) -> bool:
    """Whether the tensor gets row and column profiles: a matrix with entries (a (2^40, 0) header
    entry is a valid empty tensor, and must not get a profile of 2^40 rows)."""
    return len(plan.info.shape) == 2 and plan.info.numel > 0


def rows_cols(plan: TensorPlan) -> tuple[int, int]:
    """The tensor seen as (rows, cols): (out, in) for a `profiled` matrix; (numel, 1) otherwise."""
    shape = plan.info.shape
    return (shape[0], shape[1]) if profiled(plan) else (plan.info.numel, 1)


def base_chunk(x: np.ndarray, exp: int | None, xor: np.ndarray, out: np.ndarray) -> tuple[int, np.ndarray | None]:
    """What the runs' fast path needs to know of a base chunk, found once for every run:
    (`finiteness16` of its bits, or 0 without `exp`; for a chunk below 2 in magnitude, the
    indices of its +-0 entries, else None). Zeros are found by two min reductions: below 2,
    +0 is the smallest uint16 and -0 (0x8000) the smallest int16. `xor` and `out` are
    scratch buffers (uint16, bool) of x's size or more."""
    if exp is None:
        return 0, None
    xu = x.view(np.uint16)
    state = finiteness16(xu, exp)
    if state != BELOW_TWO:
        return state, None
    if xu.size and (xu.min() == 0 or xu.view(np.int16).min() == -0x8000):
        magnitude = np.bitwise_and(xu, 0x7FFF, out=xor[:xu.size])
        return state, np.flatnonzero(np.equal(magnitude, 0, out=out[:xu.size]))
    return state, _NO_ZEROS


_NO_ZEROS = np.empty(0, np.intp)


def _chunk_mask(x: np.ndarray, y: np.ndarray, dtype_a: str, dtype_b: str, mode: CompareMode, eta: float,
                atol: float, exp: int | None, base: tuple[int, np.ndarray | None], xor: np.ndarray,
                out: np.ndarray) -> tuple[np.ndarray, int]:
    """One chunk's update mask: flat storage arrays -> (changed bool (n,), nonfinite count).

    `exp` is given (the 16-bit exponent mask) when the fast path may apply: bitwise mode and
    one 16-bit float dtype on both sides; `base` is what `base_chunk` found. When base and run
    are both below 2 in magnitude (finite), "changed" is "bits differ" except at a +-0 pair,
    which can only sit where the base is zero: one compare, then a look at those few entries.
    Else, where the pair proof holds (`plain_bits16`), "changed" is "bits differ"; other
    chunks take `update_mask`. `xor` and `out` are scratch buffers.
    """
    if exp is not None and base[0]:
        xu, yu = x.view(np.uint16), y.view(np.uint16)
        zeros = base[1]
        if zeros is not None and finiteness16(yu, exp) == BELOW_TWO:
            m = np.not_equal(xu, yu, out=out[:x.size])
            if zeros.size:
                m[zeros[yu[zeros] == xu[zeros] ^ 0x8000]] = False
            return m, 0
        d = np.bitwise_xor(xu, yu, out=xor[:x.size])
        if plain_bits16(xu, yu, d, exp, base[0]):
            return np.not_equal(d, 0, out=out[:x.size]), 0
    changed, nonfinite = update_mask(x, y, dtype_a, dtype_b, mode, eta, atol)
    return changed, int(np.count_nonzero(nonfinite))


def _histogram(counter: np.ndarray, n_runs: int, buf: np.ndarray) -> np.ndarray:
    """(n,) per-entry counts in 0..n_runs -> (n_runs+1,) int64 histogram; `buf`: room for n bools."""
    if n_runs < 24:  # a SIMD compare-and-count per value beats bincount's cast to intp for small R
        eq = buf[:counter.size]
        h = [np.count_nonzero(np.equal(counter, k, out=eq)) for k in range(1, n_runs + 1)]
        return np.array([counter.size - sum(h), *h], np.int64)
    return np.bincount(counter, minlength=n_runs + 1).astype(np.int64)


@dataclass
class _Block:
    """What one row block adds to its tensor's statistics (R' = runs taking part)."""

    changed: np.ndarray  # (R',) int64
    nonfinite: np.ndarray  # (R',) int64
    inter: np.ndarray  # (R', R') int64, strict upper triangle
    hist: np.ndarray  # (R'+1,) int64
    row_sums: np.ndarray | None  # (block rows,) int64: per row, sum of the per-entry counts
    col_sums: np.ndarray | None  # (cols,) int64
    heat: tuple[np.ndarray, np.ndarray] | None  # (grid row indices (g,), (g, grid cols) int64 sums)


def heat_block(rows: int, cols: int) -> int:
    """Cell side of a heatmap of (rows, cols): the one `report.figures.block_average` uses for HEAT_SIZE."""
    return max(1, -(-max(rows, cols) // HEAT_SIZE))


def _chunk_rows(cols: int, chunk: int = CHUNK) -> int:
    """Rows per chunk: about `chunk` entries, and a multiple of 8 entries so packed bits stay byte-aligned."""
    rows = max(1, chunk // max(cols, 1))
    align = 8 // math.gcd(cols, 8) if cols else 1
    return -(-rows // align) * align


def block_rows(plan: TensorPlan) -> int:
    """Rows per task: the base and every run's block together map about BLOCK_BYTES, in whole chunks."""
    rows, cols = rows_cols(plan)
    per_row = max(cols, 1) * plan.info.itemsize * (1 + len(plan.runs))
    chunk = _chunk_rows(cols)
    return max(1, BLOCK_BYTES // per_row // chunk) * chunk


def _pair_counts(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit-packed masks (R, W) uint64 -> (popcounts (R,), intersections (R, R) int64).

    `inter[k, l]` (k < l, strict upper triangle) is `|M_k n M_l|`: AND the words of run k
    with those of every later run at once, count bits, sum.
    """
    R, W = words.shape
    inter = np.zeros((R, R), np.int64)
    both, bits = scratch(6, (max(R - 1, 1), W), np.uint64), scratch(7, (R, W))
    for k in range(R - 1):
        np.bitwise_and(words[k], words[k + 1:], out=both[:R - k - 1])
        inter[k, k + 1:] = np.bitwise_count(both[:R - k - 1], out=bits[:R - k - 1]).sum(axis=1, dtype=np.int64)
    return np.bitwise_count(words, out=bits).sum(axis=1, dtype=np.int64), inter


def _reader(plan: TensorPlan, first: int, n: int) -> Callable[[int, int, int], np.ndarray]:
    """`read(k, a, b)`: entries [a, b) of a block of `n` entries from `first` on, in source k
    (0 the base, k the run k - 1).

    Local files are read chunk by chunk into this worker's two buffers (the base's and the
    run's), so each chunk arrives in cache just before it is used; other sources (the Hub)
    are read a block at a time, one request per source.
    """
    sources = [plan.base, *(r.source for r in plan.runs)]
    if forkable([plan]):
        size = [plan.info.itemsize, *(r.info.itemsize for r in plan.runs)]
        return lambda k, a, b: sources[k].read(plan.name, first + a, first + min(b, n),
                                               scratch(min(k, 1), (min(b, n) - a) * size[k] + READ_SLACK))
    blocks = [s.read(plan.name, first, first + n) for s in sources]
    return lambda k, a, b: blocks[k][a:b]


def _scan_block(plan: TensorPlan, lo: int, hi: int, eta: float, atol: float, keep: bool) -> _Block:
    """Rows [lo, hi) of one tensor in the base and every run taking part; `keep`: keep the profiles.

    Work goes chunk by chunk (a few rows), every run in turn, so that the chunk's base,
    run, mask and counter stay in cache, and the histogram and row/column sums of the
    chunk's counts are taken while they are there.
    """
    rows, cols = rows_cols(plan)
    n, R, dtype = (hi - lo) * cols, len(plan.runs), plan.info.dtype
    matrix = profiled(plan)
    exp = EXPONENT16.get(dtype)
    fast = [exp if same_rule(dtype, r.info.dtype, r.mode, eta) == CompareMode.bitwise and r.info.dtype == dtype
            else None for r in plan.runs]
    if 0 < n <= min(SMALL, _chunk_rows(cols) * cols) and not keep:  # one chunk, and small
        x = plan.base.read(plan.name, lo * cols, hi * cols)
        ys = [r.source.read(plan.name, lo * cols, hi * cols) for r in plan.runs]
        return _small_block(plan, x, ys, cols if matrix else None, eta, atol, exp, fast)
    if kernels.compiled is not None and R <= 8:
        return _code_block(plan, lo, hi, eta, atol, keep, fast)
    read = _reader(plan, lo * cols, n)
    step = max(1, _chunk_rows(cols) * cols)  # at least 1: a (rows, 0) matrix has no entry to step over
    packed = scratch(2, (R, -(-n // 64) * 8))  # per run, the mask bit-packed, in whole uint64 words
    packed[:, n // 8:] = 0  # the padding, and a last partial byte
    nonfinite, hist = np.zeros(R, np.int64), np.zeros(R + 1, np.int64)
    counts = scratch(3, n if keep else min(step, n), np.uint8 if R < 256 else np.uint16)
    ne, xor = scratch(4, min(step, n), bool), scratch(5, min(step, n), np.uint16)
    row_sums = np.zeros(hi - lo, np.int64) if matrix else None
    col_sums = np.zeros(cols, np.int64) if matrix else None
    for c in range(0, n, step):
        xc = read(0, c, c + step)
        cc = counts[c:c + step] if keep else counts[:xc.size]
        cc[:] = 0
        base = base_chunk(xc, exp if any(fast) else None, xor, ne)
        for k, r in enumerate(plan.runs):
            m, nf = _chunk_mask(xc, read(k + 1, c, c + step), dtype, r.info.dtype, r.mode, eta, atol, fast[k],
                                base, xor, ne)
            nonfinite[k] += nf
            packed[k, c // 8:(c + m.size + 7) // 8] = np.packbits(m, bitorder="little")
            np.add(cc, m.view(np.uint8), out=cc, casting="unsafe")
        hist += _histogram(cc, R, ne)
        if matrix:
            c2 = cc.reshape(-1, cols)
            # Sums in the narrowest type that cannot overflow: summing into uint16 is ~4x faster than int64.
            r0 = c // cols
            row_sums[r0:r0 + len(c2)] = c2.sum(axis=1, dtype=np.uint16 if cols * R < 1 << 16 else np.int64)
            col_sums += c2.sum(axis=0, dtype=np.uint16 if len(c2) * R < 1 << 16 else np.int64)
    changed, inter = _pair_counts(packed.view(np.uint64))
    heat = _heat(counts, lo, hi, rows, cols) if keep and n else None
    return _Block(changed, nonfinite, inter, hist, row_sums, col_sums, heat)


def _heat(counts: np.ndarray, lo: int, hi: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of a block's per-entry counts ((hi - lo) * cols) over heatmap cells of side b: columns
    first, then the rows of each cell that fall in this block (a cell may span two blocks; the
    caller adds)."""
    b = heat_block(rows, cols)
    by_col = np.add.reduceat(counts.reshape(hi - lo, cols), np.arange(0, cols, b), axis=1, dtype=np.int64)
    starts = np.union1d([0], np.flatnonzero(np.arange(lo, hi) % b == 0))
    return (lo + starts) // b, np.add.reduceat(by_col, starts, axis=0)


# Bit k of each byte value (256, 8) and its popcount (256,): what a histogram of codes holds.
_CODE_BITS = (np.arange(256)[:, None] >> np.arange(8) & 1).astype(np.int64)
_CODE_RUNS = _CODE_BITS.sum(axis=1)


def _code_block(plan: TensorPlan, lo: int, hi: int, eta: float, atol: float, keep: bool, fast: list) -> _Block:
    """`_scan_block` with the compiled loops, for at most 8 runs.

    Per chunk, bit k of one byte per entry (its code) says whether run k changed it: set in
    one pass per run by `mark16` for a bitwise 16-bit run (`update.mark_wide` for a float32
    run), from `update_mask` otherwise; when
    every run is bitwise 16-bit and every source a local file, one `mark16_files` call reads
    the chunk of each source and sets all the bits (`LOOP_CHUNK` entries a chunk). One
    `tally8` pass then adds the chunk's codes to a 256-bin histogram and writes each entry's
    count of runs and their row/column sums. The histogram holds every other count exactly:
    run k's changed entries are the codes with bit k, |M_k n M_l| those with bits k and l,
    and the count histogram groups codes by popcount.
    """
    rows, cols = rows_cols(plan)
    n, R, dtype = (hi - lo) * cols, len(plan.runs), plan.info.dtype
    matrix = profiled(plan)
    nonfinite, code_hist = np.zeros(R, np.int64), np.zeros(256, np.int64)
    row_sums = np.zeros(hi - lo, np.int64) if matrix else None
    col_sums = np.zeros(cols, np.int64) if matrix else None
    loop = getattr(kernels.compiled, "mark16_files", None) if None not in fast else None
    sources = [plan.base, *(r.source for r in plan.runs)]
    with (opened(sources, plan.name, lo * cols) if loop else contextlib.nullcontext()) as files:
        if files is None:
            read = _reader(plan, lo * cols, n)
        # at least 1: a (rows, 0) matrix has no entry to step over
        step = max(1, _chunk_rows(cols, CHUNK if files is None else LOOP_CHUNK) * cols)
        codes = scratch(2, min(step, n))
        counts = scratch(3, n if keep else min(step, n)) if matrix else None
        for c in range(0, n, step):
            m = min(step, n - c)
            code = codes[:m]
            if files is not None:  # read and marked in one compiled loop
                buf = buffer(0, 2 * (2 * m + READ_SLACK))
                nonfinite += loop([(fd, at + 2 * c) for fd, at in files], m, fast[0], buf, code)
            else:
                code[:] = 0
                x = read(0, c, c + step)
                for k, r in enumerate(plan.runs):
                    y = read(k + 1, c, c + step)
                    if fast[k] is not None:  # the 16-bit exponent mask of a bitwise run
                        nonfinite[k] += kernels.compiled.mark16(x, y, fast[k], k, code)
                        continue
                    nf = mark_wide(x, y, dtype, r.info.dtype, r.mode, k, code)  # a float32 run
                    if nf is not None:
                        nonfinite[k] += nf
                        continue
                    changed, nf = update_mask(x, y, dtype, r.info.dtype, r.mode, eta, atol)
                    np.bitwise_or(code, changed.view(np.uint8) << k, out=code)
                    nonfinite[k] += int(np.count_nonzero(nf))
            cc = None if counts is None else counts[c:c + m] if keep else counts[:m]
            kernels.compiled.tally8(code, cols, code_hist, cc, None if cc is None else row_sums[c // cols:],
                                    None if cc is None else col_sums)
    bits = _CODE_BITS[:, :R]
    inter = np.triu((bits * code_hist[:, None]).T @ bits, 1)  # (R, R) exact int64 sums, strict upper
    hist = np.zeros(9, np.int64)
    np.add.at(hist, _CODE_RUNS, code_hist)
    heat = _heat(counts, lo, hi, rows, cols) if keep and n else None
    return _Block(bits.T @ code_hist, nonfinite, inter, hist[:R + 1], row_sums, col_sums, heat)


def _small_block(plan: TensorPlan, x: np.ndarray, ys: list[np.ndarray], cols: int | None, eta: float, atol: float,
                 exp: int | None, fast: list) -> _Block:
    """`_scan_block` for a block of at most SMALL entries (tiny tensors: a MoE checkpoint may hold tens of
    thousands), in a few numpy calls: the runs' masks as one (R, n) array, intersections by one product
    of exact integers. The same counts as the streamed path; `cols` is None for a tensor that is not a
    matrix (no row/column sums)."""
    R, dtype = len(plan.runs), plan.info.dtype
    masks, nonfinite = np.empty((R, x.size), bool), np.zeros(R, np.int64)
    xor, ne = np.empty(x.size, np.uint16), np.empty(x.size, bool)
    base = base_chunk(x, exp if any(fast) else None, xor, ne)
    for k, r in enumerate(plan.runs):
        masks[k], nonfinite[k] = _chunk_mask(x, ys[k], dtype, r.info.dtype, r.mode, eta, atol, fast[k], base,
                                             xor, ne)
    ints = masks.astype(np.int64)
    gram = ints @ ints.T  # (R, R): |M_k n M_l|, changed counts on the diagonal
    counts = ints.sum(axis=0)
    by_row = counts.reshape(-1, cols) if cols else None
    upper = np.where(_strict_upper(R), gram, 0)  # the streamed path's layout: strict upper triangle
    return _Block(gram.diagonal().copy(), nonfinite, upper, np.bincount(counts, minlength=R + 1),
                  by_row.sum(axis=1) if cols else None, by_row.sum(axis=0) if cols else None, None)


@functools.lru_cache(maxsize=64)
def _strict_upper(R: int) -> np.ndarray:
    """(R, R) bool, True above the diagonal (read-only: shared between calls; np.triu builds it each time)."""
    mask = np.triu(np.ones((R, R), bool), 1)
    mask.flags.writeable = False
    return mask


class _Acc:
    """Running totals of one tensor's blocks."""

    def __init__(self, plan: TensorPlan, keep: bool):
        R = len(plan.runs)
        rows, cols = rows_cols(plan)
        self.changed, self.nonfinite = np.zeros(R, np.int64), np.zeros(R, np.int64)
        self.inter, self.hist = np.zeros((R, R), np.int64), np.zeros(R + 1, np.int64)
        matrix = profiled(plan)
        self.row_sums = np.zeros(rows, np.int64) if matrix else None
        self.col_sums = np.zeros(cols, np.int64) if matrix else None
        self.heat = None
        if keep:
            b = heat_block(rows, cols)
            self.heat = np.zeros((-(-rows // b), -(-cols // b)), np.int64)

    def add(self, lo: int, hi: int, blk: _Block) -> None:
        self.changed += blk.changed
        self.nonfinite += blk.nonfinite
        self.inter += blk.inter
        self.hist += blk.hist
        if blk.row_sums is not None:
            self.row_sums[lo:hi] = blk.row_sums
            self.col_sums += blk.col_sums
        if blk.heat is not None:
            self.heat[blk.heat[0]] += blk.heat[1]


def _finish(plan: TensorPlan, acc: _Acc | _Block, n_runs: int) -> TensorConsensus:
    idx = [r.index for r in plan.runs]
    R = len(idx)
    rows, cols = rows_cols(plan)
    numel = plan.info.numel
    inter = acc.inter + acc.inter.T
    inter.flat[::R + 1] = acc.changed
    if R == n_runs:  # every run took part (idx is 0..R-1): the arrays as they are
        changed, nonfinite = acc.changed, acc.nonfinite
    else:
        changed, nonfinite = np.zeros(n_runs, np.int64), np.zeros(n_runs, np.int64)
        changed[idx], nonfinite[idx] = acc.changed, acc.nonfinite
        inter, part = np.zeros((n_runs, n_runs), np.int64), inter
        inter[np.ix_(idx, idx)] = part
    p = acc.changed / max(numel, 1)
    rho = kappa = heat = None
    row_idx = col_idx = None
    b = None
    if acc.row_sums is not None:
        rho = acc.row_sums / (R * cols) if cols else np.zeros(rows)
        kappa = acc.col_sums / (R * rows) if rows else np.zeros(cols)
        row_idx, col_idx = stripe_index(rho, p, cols), stripe_index(kappa, p, rows)
    if acc.heat is not None:
        b = heat_block(rows, cols)
        cells = np.outer(np.minimum(b, rows - b * np.arange(acc.heat.shape[0])),
                         np.minimum(b, cols - b * np.arange(acc.heat.shape[1])))
        heat = acc.heat / (cells * R)
    else:
        rho = kappa = None
    return TensorConsensus(plan.name, plan.layer, plan.module, plan.group, plan.info.shape, tuple(idx), numel,
                           changed, nonfinite, inter, acc.hist.copy(), row_idx, col_idx, rho, kappa, heat, b,
                           plan.param.transposed)


def scan(plans: Sequence[TensorPlan], n_runs: int, eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL,
         profiles: Collection[str] = (), progress: Callable[[int], None] | None = None,
         workers: int | None = None) -> Iterator[TensorConsensus]:
    """Stream every planned tensor in row blocks; yield one `TensorConsensus` per plan, in order.

    `n_runs` is R, the length of the per-run arrays. Matrices named in `profiles` keep their
    row/column ratio profiles and a heatmap. `progress`, if given, is called with the bytes
    read after each block.
    """
    keep = {p.name for p in plans if p.name in profiles and profiled(p)}

    def work(plan: TensorPlan, start: int, stop: int) -> _Block:
        cols = rows_cols(plan)[1]  # windows are whole rows
        return _scan_block(plan, start // max(cols, 1), stop // max(cols, 1), eta, atol, plan.name in keep)

    def step(plan: TensorPlan) -> int:
        return block_rows(plan) * rows_cols(plan)[1]

    for plan, blocks in run_windows(plans, work, step, workers, progress):
        if len(blocks) == 1 and blocks[0].heat is None:  # one block holds the tensor's totals already
            yield _finish(plan, blocks[0], n_runs)
            continue
        acc = _Acc(plan, plan.name in keep)
        lo = 0
        for blk in blocks:
            hi = lo + len(blk.row_sums) if blk.row_sums is not None else lo
            acc.add(lo, hi, blk)
            lo = hi
        yield _finish(plan, acc, n_runs)
