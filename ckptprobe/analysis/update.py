"""Which weights did a fine-tune change? The bf16-aware update rule.

"The Path Not Taken" (Def. 2.1/2.2) calls a weight unchanged iff
`|w' - w| <= eta * max(|w|, |w'|)` with eta = 1e-3. Since eta < 2^-9 (half a bf16
ULP, relative), two bf16 values satisfy it exactly when their bits are equal (with
+0 == -0), so for bf16 checkpoints the rule *is* a bitwise comparison, which is also
the cheapest one. Other modes serve other checkpoints and comparisons:

- bitwise: storage equality (both sides one dtype); the paper's probe for bf16.
- bf16:    round both sides to bf16 first: "would this change survive bf16 storage?"
- eta:     the relative rule with any eta.
- atol:    `|w' - w| <= atol`, the fixed tolerance of earlier work. It over-reports
           for large weights (1024.001 vs 1024.002 in fp32 differ by 1e-3 > 1e-5,
           yet are the same bf16 value) and under-reports for small ones (1e-6 vs
           2e-6 differ by 1e-6 < 1e-5, yet are a 2x change that bf16 keeps).

Entries where either side is NaN or +-inf are counted as non-finite, never as
changed or unchanged.
"""

from __future__ import annotations


import numpy as np

from ckptprobe.analysis import kernels
from ckptprobe.analysis.bf16 import to_bf16_bits, to_float32
from ckptprobe.analysis.choices import DEFAULT_ATOL, DEFAULT_ETA, CompareMode, default_mode, same_rule  # noqa: F401
from ckptprobe.analysis.kernels import EXPONENT16, one_pass
from ckptprobe.errors import UsageError


_CHUNK = 1 << 19  # elements per step of the fast path: 1 MiB of 16-bit values, sparsity's READ


def has_nonfinite16(bits: np.ndarray, exp: int) -> bool:
    """Whether uint16 bits of a 16-bit float (exponent mask `exp`) hold an inf or NaN.

    As int16, positive inf/NaN are the largest values; as uint16, negative ones are.
    """
    return bool(bits.view(np.int16).max() >= exp or bits.max() >= 0x8000 | exp)


BELOW_TWO, FINITE = 2, 1  # what `finiteness16` proves of a chunk (0: it holds an inf or NaN)


def finiteness16(bits: np.ndarray, exp: int) -> int:
    """What uint16 bits of a 16-bit float (exponent mask `exp`) are: BELOW_TWO, FINITE or 0 (an inf/NaN).

    inf/NaN have every exponent bit set, the top one (0x4000, in bf16 and fp16 alike)
    included, which no value of magnitude below 2 has. One OR over 64-bit words (four
    values each) shows whether any value sets it: for weights it almost never does, and
    that one pass replaces the two reductions of `has_nonfinite16`, which decide otherwise.
    """
    n4 = bits.size - bits.size % 4
    word = int(np.bitwise_or.reduce(bits[:n4].view(np.uint64))) if n4 else 0
    word |= int(np.bitwise_or.reduce(bits[n4:])) if n4 < bits.size else 0
    if not (word | word >> 16 | word >> 32 | word >> 48) & 0x4000:
        return BELOW_TWO
    return 0 if has_nonfinite16(bits, exp) else FINITE


def surely_finite16(bits: np.ndarray, exp: int) -> bool:
    """Whether uint16 bits of a 16-bit float (exponent mask `exp`) hold no inf/NaN (`finiteness16`)."""
    return finiteness16(bits, exp) > 0


def plain_bits16(x: np.ndarray, y: np.ndarray, xor: np.ndarray, exp: int, x_state: int | None = None) -> bool:
    """Whether, on this chunk, "changed" is exactly "bits differ": the pair proof of the bitwise fast path.

    x, y: uint16 bits of a 16-bit float (exponent mask `exp`); xor = x ^ y. Two finite values
    whose bits differ are different numbers except +0 and -0, whose xor is the sign bit alone
    (0x8000, the smallest int16); a value that crosses zero differs in more bits and stays on
    the fast path. So the proof is: no xor equal to 0x8000, and no inf/NaN on either side.
    `x_state`: `finiteness16(x, exp)` when the caller already knows it (one base, many runs).

    The usual chunk costs one max of the xor: when every xor is below 0x4000, each pair
    shares its sign (no +-0 pair) and its 0x4000 bit, so a base below 2 in magnitude has a
    fine-tune below 2 as well, and both are finite.
    """
    if xor.size == 0:
        return True
    x_state = finiteness16(x, exp) if x_state is None else x_state
    if x_state == BELOW_TWO and xor.max() < 0x4000:
        return True
    if not x_state or xor.view(np.int16).min() == -0x8000:
        return False
    return surely_finite16(y, exp)


def _values(raw: np.ndarray, dtype: str) -> np.ndarray:
    return raw.astype(np.float64) if dtype == "F64" else to_float32(raw, dtype)


WIDE_F32, WIDE_BF16_F32, WIDE_F32_BF16 = "f32", "bf16/f32", "f32/bf16"


def wide_pair(dtype_a: str, dtype_b: str, mode: CompareMode) -> str | None:
    """Which compiled loop compares a pair with a float32 side: WIDE_F32 (two float32, bitwise:
    `count32`, `mark32`), WIDE_BF16_F32 or WIDE_F32_BF16 (a bf16 side against a float32 side
    rounded to bf16, in bf16 mode: `count_bf16_f32`, `mark_bf16_f32`, the bf16 side first); None
    for any other pair."""
    if mode == CompareMode.bitwise and dtype_a == dtype_b == "F32":
        return WIDE_F32
    if mode == CompareMode.bf16 and (dtype_a, dtype_b) == ("BF16", "F32"):
        return WIDE_BF16_F32
    if mode == CompareMode.bf16 and (dtype_a, dtype_b) == ("F32", "BF16"):
        return WIDE_F32_BF16
    return None


def mark_wide(a: np.ndarray, b: np.ndarray, dtype_a: str, dtype_b: str, mode: CompareMode, bit: int,
              codes: np.ndarray) -> int | None:
    """Bit `bit` of codes[i] (uint8) := pair i changed, by a compiled float32 mark (`wide_pair`): the
    non-finite count, or None (codes untouched) when no compiled mark takes the pair."""
    wide = wide_pair(dtype_a, dtype_b, mode) if kernels.compiled is not None else None
    if wide is None:
        return None
    mark = kernels.compiled.mark32 if wide == WIDE_F32 else kernels.compiled.mark_bf16_f32
    return mark(*((b, a) if wide == WIDE_F32_BF16 else (a, b)), bit, codes)  # the rule is symmetric


def update_mask(a: np.ndarray, b: np.ndarray, dtype_a: str, dtype_b: str, mode: CompareMode,
                eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL) -> tuple[np.ndarray, np.ndarray]:
    """Storage arrays of one shape -> (changed, nonfinite) bool arrays of that shape.

    `a` is the base, `b` the fine-tune, each in its storage dtype (BF16 as uint16 bits).
    `changed` is False wherever `nonfinite` is True. A bitwise 16-bit pair takes one compiled
    pass (`kernels`) when it can, and so does a pair with a float32 side (`wide_pair`) that
    holds no inf or NaN.
    """
    mode = same_rule(dtype_a, dtype_b, mode, eta)
    if wide_pair(dtype_a, dtype_b, mode) and a.shape == b.shape and a.flags.c_contiguous and b.flags.c_contiguous:
        changed = np.zeros(a.shape, bool)  # bit 0 of each byte: a bool array
        if mark_wide(a, b, dtype_a, dtype_b, mode, 0, changed.view(np.uint8)) == 0:
            return changed, np.zeros(a.shape, bool)
        # an inf or NaN (rare), or no compiled loops: the passes below find which entries
    if mode == CompareMode.bf16:
        a, b, dtype_a, dtype_b = to_bf16_bits(a, dtype_a), to_bf16_bits(b, dtype_b), "BF16", "BF16"
        mode = CompareMode.bitwise
    if mode == CompareMode.bitwise and dtype_a != dtype_b:
        raise UsageError(f"bitwise comparison needs one dtype on both sides, got {dtype_a} and {dtype_b}",
                         hint="use --mode bf16 (round both to bf16) or --mode eta")
    if one_pass(dtype_a, dtype_b, mode) and a.shape == b.shape and a.flags.c_contiguous and b.flags.c_contiguous:
        exp = EXPONENT16[dtype_a]
        changed = np.zeros(a.shape, bool)  # bit 0 of each byte, written by mark16: a bool array
        if not kernels.compiled.mark16(a, b, exp, 0, changed.view(np.uint8)):
            return changed, np.zeros(a.shape, bool)
        ua, ub = a.view(np.uint16), b.view(np.uint16)
        return changed, ((ua & exp) == exp) | ((ub & exp) == exp)
    if dtype_a not in ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"):  # integers, bools: plain equality
        return a != b, np.zeros(a.shape, bool)
    fa, fb = _values(a, dtype_a), _values(b, dtype_b)
    nonfinite = ~(np.isfinite(fa) & np.isfinite(fb))
    if mode == CompareMode.bitwise:
        changed = (a != b) & ~((fa == 0) & (fb == 0))  # +0 and -0 are the same weight
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(fb - fa)
            tol = eta * np.maximum(np.abs(fa), np.abs(fb)) if mode == CompareMode.eta else atol
            changed = diff > tol
    return changed & ~nonfinite, nonfinite


def count_changes(a: np.ndarray, b: np.ndarray, dtype_a: str, dtype_b: str, mode: CompareMode,
                  eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL) -> tuple[int, int]:
    """Flat storage arrays -> (changed, nonfinite) counts; the same numbers as `update_mask`, faster.

    The bitwise 16-bit case (every bf16 checkpoint) takes a fast path: one compiled pass
    (`kernels`), or else, per cache-sized chunk, xor and count the nonzero words after the
    pair proof (`plain_bits16`); a chunk that fails the proof goes through `update_mask`.
    Two float32 checkpoints compared bitwise, and a bf16 one against a float32 one in bf16
    mode (the default for that pair), take one compiled pass as well.
    """
    mode = same_rule(dtype_a, dtype_b, mode, eta)
    exp = EXPONENT16.get(dtype_a) if mode == CompareMode.bitwise and dtype_a == dtype_b else None
    compiled = kernels.compiled if a.flags.c_contiguous and b.flags.c_contiguous else None
    if exp is None:
        wide = wide_pair(dtype_a, dtype_b, mode) if compiled is not None else None
        if wide == WIDE_F32:
            return compiled.count32(a, b)
        if wide is not None:  # the rule is symmetric: the bf16 side goes first
            return compiled.count_bf16_f32(*((a, b) if wide == WIDE_BF16_F32 else (b, a)))
        changed, nonfinite = update_mask(a, b, dtype_a, dtype_b, mode, eta, atol)
        return int(np.count_nonzero(changed)), int(np.count_nonzero(nonfinite))
    if compiled is not None:
        return compiled.count16(a, b, exp)
    changed = nonfinite = 0
    buf = np.empty(min(_CHUNK, a.size), np.uint16)
    ua, ub = a.view(np.uint16), b.view(np.uint16)  # F16 storage is float16: work on its bits
    for i in range(0, a.size, _CHUNK):
        x, y = ua[i:i + _CHUNK], ub[i:i + _CHUNK]
        xor = np.bitwise_xor(x, y, out=buf[:x.size])
        if plain_bits16(x, y, xor, exp):
            changed += int(np.count_nonzero(xor))
        else:
            c, n = update_mask(a[i:i + _CHUNK], b[i:i + _CHUNK], dtype_a, dtype_b, mode)
            changed, nonfinite = changed + int(np.count_nonzero(c)), nonfinite + int(np.count_nonzero(n))
    return changed, nonfinite
