"""The update rule ("which weights changed?") and the numeric helpers under it, against
torch's conversions, exact rational arithmetic and the paper's known answers (Appendix D)."""

from __future__ import annotations

import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptprobe.analysis.update as update
from ckptprobe.analysis import kernels
from ckptprobe.analysis.bf16 import (bf16_bits_to_float32, float32_to_bf16_bits, to_bf16_bits, to_float32,
                                     to_torch)
from ckptprobe.analysis.update import CompareMode, count_changes, default_mode, update_mask
from ckptprobe.errors import UsageError

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
MODES = list(CompareMode)


# ---- references ---------------------------------------------------------------------------

def torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, as torch rounds."""
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def torch_values(bits: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "BF16":
        return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(bits.view(np.float16).copy())


def reference_bitwise(a_bits: np.ndarray, b_bits: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(changed, nonfinite) from torch values: for finite values, value inequality is bit inequality
    except that +0 == -0, which is exactly the rule."""
    ta, tb = torch_values(a_bits, dtype), torch_values(b_bits, dtype)
    finite = torch.isfinite(ta) & torch.isfinite(tb)
    return ((ta != tb) & finite).numpy(), (~finite).numpy()


def bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def is_nan_bits(bits: np.ndarray) -> np.ndarray:
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)


# ---- the paper's known answers (Appendix D) -----------------------------------------------

def rule(a, b, dtype_a, dtype_b, mode, **kw) -> bool:
    changed, nonfinite = update_mask(np.asarray([a]), np.asarray([b]), dtype_a, dtype_b, mode, **kw)
    assert not nonfinite[0]
    return bool(changed[0])


def test_large_weight_atol_over_reports():
    a, b = np.float32(1024.001), np.float32(1024.002)
    assert a != b and abs(float(b) - float(a)) > 1e-5
    assert torch_bf16_bits(np.array([a]))[0] == torch_bf16_bits(np.array([b]))[0]  # one bf16 value
    assert rule(a, b, "F32", "F32", CompareMode.atol)  # |diff| ~ 1e-3 > 1e-5: "changed"
    assert not rule(a, b, "F32", "F32", CompareMode.bf16)
    assert not rule(a, b, "F32", "F32", CompareMode.eta)  # 1e-3 <= 1e-3 * 1024
    assert rule(a, b, "F32", "F32", CompareMode.bitwise)  # the fp32 bits do differ
    assert count_changes(np.array([a]), np.array([b]), "F32", "F32", CompareMode.atol) == (1, 0)
    assert count_changes(np.array([a]), np.array([b]), "F32", "F32", CompareMode.bf16) == (0, 0)


def test_small_weight_atol_under_reports():
    a, b = np.float32(1e-6), np.float32(2e-6)
    assert torch_bf16_bits(np.array([a]))[0] != torch_bf16_bits(np.array([b]))[0]  # bf16 keeps the 2x change
    assert not rule(a, b, "F32", "F32", CompareMode.atol)  # |diff| = 1e-6 <= 1e-5: "unchanged"
    assert rule(a, b, "F32", "F32", CompareMode.eta)
    assert rule(a, b, "F32", "F32", CompareMode.bf16)
    assert rule(a, b, "F32", "F32", CompareMode.bitwise)
    bits = float32_to_bf16_bits(np.array([a, b], np.float32))
    assert rule(bits[0], bits[1], "BF16", "BF16", CompareMode.bitwise)
    assert not rule(bits[0], bits[1], "BF16", "BF16", CompareMode.atol)


def test_custom_tolerances():
    assert not rule(np.float32(1.0), np.float32(1.01), "F32", "F32", CompareMode.eta, eta=0.02)
    assert rule(np.float32(1.0), np.float32(1.01), "F32", "F32", CompareMode.eta, eta=0.005)
    assert not rule(np.float32(1.0), np.float32(1.01), "F32", "F32", CompareMode.atol, atol=0.02)
    assert rule(np.float32(1.0), np.float32(1.01), "F32", "F32", CompareMode.atol, atol=0.005)


def test_default_mode_and_dtype_checks():
    assert default_mode("BF16", "BF16") == CompareMode.bitwise
    assert default_mode("F32", "F32") == CompareMode.bitwise
    assert default_mode("F32", "BF16") == CompareMode.bf16
    with pytest.raises(UsageError, match="F32 and BF16"):
        update_mask(np.zeros(2, np.float32), np.zeros(2, np.uint16), "F32", "BF16", CompareMode.bitwise)
    changed, _ = update_mask(np.zeros(2, np.float32), np.array([0, 0x3F80], np.uint16), "F32", "BF16", CompareMode.bf16)
    assert changed.tolist() == [False, True]


def test_integer_tensors_compare_by_equality():
    a, b = np.array([1, 2, 3, -4], np.int64), np.array([1, 5, 3, 4], np.int64)
    for mode in (CompareMode.bitwise, CompareMode.eta, CompareMode.atol):
        changed, nonfinite = update_mask(a, b, "I64", "I64", mode)
        assert changed.tolist() == [False, True, False, True] and not nonfinite.any()
        assert count_changes(a, b, "I64", "I64", mode) == (2, 0)


# ---- the eta rule is bitwise equality for bf16 --------------------------------------------

magnitude = st.integers(0, 0x7F7F)  # every finite bf16 magnitude, subnormals and zero included
finite_bf16 = st.builds(lambda s, m: s << 15 | m, st.integers(0, 1), magnitude)


@st.composite
def bf16_pairs(draw):
    a = draw(finite_bf16)
    kind = draw(st.sampled_from(["independent", "near", "sign", "same", "zero", "subnormal"]))
    if kind == "independent":
        b = draw(finite_bf16)
    elif kind == "near":  # a few ULPs apart, same sign
        b = (a & 0x8000) | min(max((a & 0x7FFF) + draw(st.integers(-3, 3)), 0), 0x7F7F)
    elif kind == "sign":
        b = a ^ 0x8000
    elif kind == "same":
        b = a
    elif kind == "zero":
        a, b = draw(st.sampled_from([0, 0x8000])), draw(st.sampled_from([0, 0x8000, 1, 0x8001]))
    else:
        a, b = draw(st.integers(0, 0x7F)) | draw(st.sampled_from([0, 0x8000])), draw(st.integers(0, 0x7F))
    return a, b


@SETTINGS
@given(st.lists(bf16_pairs(), min_size=1, max_size=200))
def test_eta_rule_is_bitwise_for_bf16(pairs):
    """|w'-w| <= 1e-3 max(|w|,|w'|) holds for two finite bf16 values iff their bits are equal (+0 == -0).

    One bf16 ULP is at least 2^-8 of the larger magnitude (normals: 8 significant bits; subnormals:
    the spacing 2^-133 is at least 1/127 of any nonzero subnormal), and 2^-8 > 1e-3. The float32
    arithmetic inside is exact enough: the difference of two values within a factor 2 is exact
    (Sterbenz), and numpy does not flush subnormals to zero.
    """
    a = np.array([p[0] for p in pairs], np.uint16)
    b = np.array([p[1] for p in pairs], np.uint16)
    changed, nonfinite = update_mask(a, b, "BF16", "BF16", CompareMode.eta, eta=1e-3)
    bitwise = (a != b) & ~(((a & 0x7FFF) == 0) & ((b & 0x7FFF) == 0))
    assert not nonfinite.any()
    np.testing.assert_array_equal(changed, bitwise)
    # and the rule in exact rational arithmetic says the same
    for (x, y), c in zip(pairs, changed):
        va, vb = Fraction(bf16_value(x)), Fraction(bf16_value(y))
        assert c == (abs(vb - va) > Fraction(1, 1000) * max(abs(va), abs(vb)))
    np.testing.assert_array_equal(update_mask(a, b, "BF16", "BF16", CompareMode.bitwise)[0], bitwise)


def test_eta_rule_every_bf16_neighbour():
    """Exhaustive: each finite bf16 value against itself, its sign flip and its next magnitude."""
    mags = np.arange(0x7F7F, dtype=np.uint16)  # next magnitude of 0x7F7E is 0x7F7F, still finite
    for sign in (0, 0x8000):
        a = mags | np.uint16(sign)
        for b, expect in ((a, np.zeros(a.size, bool)), (a + 1, np.ones(a.size, bool)),
                          (a ^ np.uint16(0x8000), mags != 0)):
            changed, nonfinite = update_mask(a, b, "BF16", "BF16", CompareMode.eta)
            np.testing.assert_array_equal(changed, expect)
            assert not nonfinite.any()


@pytest.mark.parametrize("eta", [0.0, 1e-3, 2.0 ** -8 * (1 - 2 ** -20), 2.0 ** -8, 0.01])
def test_eta_on_bf16_is_bitwise_below_one_step_only(eta):
    """Two bf16 sides with eta < 2^-8 take the bitwise loops (the same rule, `choices.same_rule`); at 2^-8 the
    step from 255/128 to 2 (exactly 2^-8 of the larger) passes the rule, so from there on the values decide.
    Against the rule in exact rational arithmetic, every mantissa step of two binades, both signs."""
    a = np.concatenate([np.arange(0x3F00, 0x4080, dtype=np.uint16), np.arange(0xBF00, 0xC080, dtype=np.uint16)])
    b = a + np.uint16(1)
    want = np.array([abs(Fraction(bf16_value(y)) - Fraction(bf16_value(x)))
                     > Fraction(eta) * max(abs(Fraction(bf16_value(x))), abs(Fraction(bf16_value(y))))
                     for x, y in zip(a.tolist(), b.tolist())])
    changed, nonfinite = update_mask(a, b, "BF16", "BF16", CompareMode.eta, eta=eta)
    np.testing.assert_array_equal(changed, want)
    assert count_changes(a, b, "BF16", "BF16", CompareMode.eta, eta=eta) == (int(want.sum()), 0)
    assert want.all() == (eta < 2.0 ** -8)  # the boundary: at 2^-8 the 255/128 -> 2 step is "unchanged"


def test_f16_one_ulp_can_pass_the_eta_rule():
    """fp16 keeps 11 significant bits: near the top of a binade one ULP is < 1e-3 relative, so
    the eta rule and bitwise comparison differ there (they only coincide for bf16)."""
    a = np.array([1.999], np.float16)
    b = np.nextafter(a, np.float16(3))
    assert not update_mask(a, b, "F16", "F16", CompareMode.eta)[0][0]
    assert update_mask(a, b, "F16", "F16", CompareMode.bitwise)[0][0]


# ---- non-finite entries --------------------------------------------------------------------

SPECIAL_PAIRS = [(np.nan, 1.0), (1.0, np.nan), (np.nan, np.nan), (np.inf, np.inf), (-np.inf, -np.inf),
                 (np.inf, -np.inf), (2.0, np.inf), (-np.inf, 0.0), (1.0, 1.0), (1.0, 2.0), (0.0, -0.0)]
SPECIAL_CHANGED = [False] * 8 + [False, True, False]
SPECIAL_NONFINITE = [True] * 8 + [False] * 3


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_counted_separately(engine, dtype, mode):
    a = np.array([p[0] for p in SPECIAL_PAIRS], np.float32)
    b = np.array([p[1] for p in SPECIAL_PAIRS], np.float32)
    convert = {"F32": lambda x: x, "F16": lambda x: x.astype(np.float16), "F64": lambda x: x.astype(np.float64),
               "BF16": float32_to_bf16_bits}[dtype]
    changed, nonfinite = update_mask(convert(a), convert(b), dtype, dtype, mode)
    assert changed.tolist() == SPECIAL_CHANGED
    assert nonfinite.tolist() == SPECIAL_NONFINITE
    assert count_changes(convert(a), convert(b), dtype, dtype, mode) == (1, 8)


def test_nonfinite_mixed_dtypes(engine):
    a = np.array([p[0] for p in SPECIAL_PAIRS], np.float32)
    b = float32_to_bf16_bits(np.array([p[1] for p in SPECIAL_PAIRS], np.float32))
    for mode in (CompareMode.bf16, CompareMode.eta, CompareMode.atol):
        changed, nonfinite = update_mask(a, b, "F32", "BF16", mode)
        assert changed.tolist() == SPECIAL_CHANGED and nonfinite.tolist() == SPECIAL_NONFINITE
        assert count_changes(a, b, "F32", "BF16", mode) == (1, 8)


# ---- count_changes (fast path) == update_mask (exact path) == torch -------------------------

KINDS = ["nan_a", "nan_b", "inf_a", "ninf_b", "inf_both", "zeros", "sign_flip", "cross_zero", "ulp"]


def plant(a: np.ndarray, b: np.ndarray, dtype: str, kind: str, i: int) -> None:
    nan, inf = (0x7FC0, 0x7F80) if dtype == "BF16" else (0x7E00, 0x7C00)
    if kind == "nan_a":
        a[i] = nan
    elif kind == "nan_b":
        b[i] = nan | 0x8000
    elif kind == "inf_a":
        a[i] = inf
    elif kind == "ninf_b":
        b[i] = inf | 0x8000
    elif kind == "inf_both":
        a[i] = b[i] = inf
    elif kind == "zeros":
        a[i], b[i] = 0x8000, 0
    elif kind == "sign_flip":  # the same magnitude, the other sign
        b[i] = a[i] ^ 0x8000
    elif kind == "cross_zero":  # a small weight moving across zero: sign and magnitude differ
        b[i] = (a[i] ^ 0x8000) + 1
    else:
        b[i] = a[i] + 1


def random_pair(dtype: str, n: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """bits of N(0, 0.02^2) weights and a copy with `fraction` of them one ULP further from zero."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    a = float32_to_bf16_bits(x) if dtype == "BF16" else x.astype(np.float16).view(np.uint16)
    b = a.copy()
    b[rng.random(n) < fraction] += 1
    return a, b


def storage(bits: np.ndarray, dtype: str) -> np.ndarray:
    return bits if dtype == "BF16" else bits.view(np.float16)


@settings(SETTINGS, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["BF16", "F16"]),
       n=st.sampled_from([1, 7, update._CHUNK, 2 * update._CHUNK + 777]),
       seed=st.integers(0, 2 ** 32 - 1),
       fraction=st.sampled_from([0.0, 0.01, 0.4, 1.0]),
       plants=st.lists(st.tuples(st.sampled_from(KINDS), st.floats(0, 1, exclude_max=True)), max_size=12))
def test_count_changes_matches_mask_and_torch(engine, dtype, n, seed, fraction, plants):
    a, b = random_pair(dtype, n, seed, fraction)
    for kind, where in plants:
        plant(a, b, dtype, kind, int(where * n))
    ref_changed, ref_nonfinite = reference_bitwise(a, b, dtype)
    changed, nonfinite = update_mask(storage(a, dtype), storage(b, dtype), dtype, dtype, CompareMode.bitwise)
    np.testing.assert_array_equal(changed, ref_changed)
    np.testing.assert_array_equal(nonfinite, ref_nonfinite)
    counts = (int(ref_changed.sum()), int(ref_nonfinite.sum()))
    assert count_changes(storage(a, dtype), storage(b, dtype), dtype, dtype, CompareMode.bitwise) == counts
    if dtype == "BF16":  # eta (1e-3) and bf16 modes agree with bitwise for bf16 checkpoints
        assert count_changes(a, b, dtype, dtype, CompareMode.eta) == counts
        assert count_changes(a, b, dtype, dtype, CompareMode.bf16) == counts


@SETTINGS
@given(mode=st.sampled_from([CompareMode.bf16, CompareMode.eta, CompareMode.atol]), seed=st.integers(0, 2 ** 32 - 1),
       plants=st.lists(st.tuples(st.sampled_from(KINDS), st.floats(0, 1, exclude_max=True)), max_size=8))
def test_count_changes_mixed_dtypes(mode, seed, plants):
    a, b = random_pair("BF16", 5000, seed, 0.3)
    for kind, where in plants:
        plant(a, b, "BF16", kind, int(where * a.size))
    base = bf16_bits_to_float32(a)
    rng = np.random.default_rng(seed)
    # sub-ULP fp32 noise (low 16 bits below half a bf16 ULP): invisible once rounded to bf16
    finite = np.isfinite(base)
    noisy = (base.view(np.uint32) | (rng.integers(0, 0x7FFF, a.size, dtype=np.uint32) * finite)).view(np.float32)
    changed, nonfinite = update_mask(noisy, b, "F32", "BF16", mode)
    assert count_changes(noisy, b, "F32", "BF16", mode) == (int(changed.sum()), int(nonfinite.sum()))
    if mode == CompareMode.bf16:
        ref_changed, ref_nonfinite = reference_bitwise(a, b, "BF16")
        np.testing.assert_array_equal(changed, ref_changed)
        np.testing.assert_array_equal(nonfinite, ref_nonfinite)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_fast_path_only_where_it_is_safe(engine, dtype, monkeypatch):
    """Clean chunks are counted by xor alone; only a chunk holding a special entry takes the exact path
    (none does with the compiled loops, which apply the rule entry by entry)."""
    a, b = random_pair(dtype, 3 * update._CHUNK, 0, 0.4)
    plant(a, b, dtype, "zeros", update._CHUNK + 5)  # -0 vs +0 differ in bits, not in value
    calls = []
    real = update.update_mask

    def spy(x, y, *args, **kw):
        calls.append(x.size)
        return real(x, y, *args, **kw)

    for i in range(2 * update._CHUNK, 3 * update._CHUNK, 100):
        plant(a, b, dtype, "cross_zero", i)  # real changes: no reason to leave the fast path
    monkeypatch.setattr(update, "update_mask", spy)
    expected = int(reference_bitwise(a, b, dtype)[0].sum())
    assert count_changes(storage(a, dtype), storage(b, dtype), dtype, dtype, CompareMode.bitwise) == (expected, 0)
    assert calls == ([update._CHUNK] if engine == "numpy" else [])
    assert expected == int(np.count_nonzero(a != b)) - 1  # the +-0 pair is not a change


@SETTINGS
@given(dtype=st.sampled_from(["BF16", "F16"]), n=st.integers(0, 70),
       codes=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=70), seed=st.integers(0, 2 ** 32 - 1))
def test_pair_proof_against_brute_force(dtype, n, codes, seed):
    """`surely_finite16` and `plain_bits16` against their definitions, on any bits (large finite values,
    +-0, inf, NaN) and lengths that are not a multiple of the 4 values in a 64-bit word."""
    rng = np.random.default_rng(seed)
    x = rng.choice(np.array(codes, np.uint16), n)
    y = np.where(rng.random(n) < 0.5, x, rng.choice(np.array(codes, np.uint16), n)).astype(np.uint16)
    exp = update.EXPONENT16[dtype]
    finite = lambda b: bool(((b & exp) != exp).all())  # noqa: E731
    assert update.surely_finite16(x, exp) == finite(x)
    values = lambda b: bf16_bits_to_float32(b) if dtype == "BF16" else b.view(np.float16).astype(np.float32)  # noqa: E731
    with np.errstate(invalid="ignore"):
        below_two = bool((np.abs(values(x)) < 2).all())  # False for NaN
    assert (update.finiteness16(x, exp) == update.BELOW_TWO) == below_two
    proof = update.plain_bits16(x, y, x ^ y, exp)
    assert proof == (finite(x) and finite(y) and not ((x ^ y) == 0x8000).any())
    if proof:  # and what it proves: bits differ exactly where values do
        assert ((x != y) == (values(x) != values(y))).all()


def test_pair_proof_takes_large_finite_values_and_zeros_on_the_fast_path():
    """Values of magnitude >= 2 only make the cheap test ask the exact one; exact zeros on either side
    (not paired with the other zero) never leave the fast path."""
    x = float32_to_bf16_bits(np.array([0.0, 3.5, -1e30, 0.0, 1.0, -0.0, 2.0, 0.5], np.float32))
    y = float32_to_bf16_bits(np.array([0.0, 3.5, -1e30, 1e-3, 0.0, -0.0, -2.5, 0.5], np.float32))
    assert update.plain_bits16(x, y, x ^ y, 0x7F80)
    assert count_changes(x, y, "BF16", "BF16", CompareMode.bitwise) == (3, 0)
    z = y.copy()
    z[0] = 0x8000  # +0 vs -0: the same weight
    assert not update.plain_bits16(x, z, x ^ z, 0x7F80)
    assert count_changes(x, z, "BF16", "BF16", CompareMode.bitwise) == (3, 0)


# ---- conversions against torch --------------------------------------------------------------

def check_bf16_rounding(x: np.ndarray) -> None:
    ours, ref = float32_to_bf16_bits(x), torch_bf16_bits(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    # NaN stays a (quiet) NaN with its sign. torch's NaN bits are not canonical (0x7FC0 from a
    # scalar, 0xFFFF from its vectorised CPU path), so only NaN-ness is compared with torch.
    assert is_nan_bits(ours[nan]).all() and is_nan_bits(ref[nan]).all()
    assert ((ours[nan] & 0x40) != 0).all()
    np.testing.assert_array_equal(ours[nan] >> 15, np.signbit(x[nan]))


def test_float32_to_bf16_sweep():
    """Every bf16 pattern with the low halves that matter for rounding: exact, just below/at/above the tie."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lo = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    check_bf16_rounding((hi[:, None] | lo[None, :]).reshape(-1).view(np.float32))


def test_float32_to_bf16_known_answers():
    u = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00008000,
                  0x00018000, 0x80000000], np.uint32)
    assert float32_to_bf16_bits(u.view(np.float32)).tolist() == [
        0x3F80,  # 1 + 2^-8 is a tie: to even, down
        0x3F82,  # tie above an odd value: up
        0x3F81,  # just above the tie: up
        0x7F7F,  # below the tie at the largest bf16: stays finite
        0x7F80,  # the tie at the largest bf16 rounds to even, which is inf
        0x7F80, 0xFF80,  # overflow to +-inf
        0x0000, 0x0002,  # subnormal ties
        0x8000]  # -0 keeps its sign


@SETTINGS
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True), min_size=1,
                max_size=300))
def test_float32_to_bf16_matches_torch(values):
    check_bf16_rounding(np.array(values, np.float32))


def test_bf16_bits_to_float32_all_patterns():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = bf16_bits_to_float32(bits)
    ref = torch_values(bits, "BF16").float().numpy()
    nan = np.isnan(ref)
    np.testing.assert_array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    np.testing.assert_array_equal(np.isnan(ours), nan)
    assert float32_to_bf16_bits(ours)[~nan].tolist() == bits[~nan].tolist()  # round trip


@pytest.mark.parametrize("dtype,torch_dtype", [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)])
def test_fp8_tables_match_torch(dtype, torch_dtype):
    codes = np.arange(256, dtype=np.uint8)
    ours = to_float32(codes, dtype)
    ref = torch.from_numpy(codes).view(torch_dtype).float().numpy()
    nan = np.isnan(ref)
    assert nan.sum() == (2 if dtype == "F8_E4M3" else 6)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])  # -0 included
    assert np.isinf(ours).sum() == (0 if dtype == "F8_E4M3" else 2)
    np.testing.assert_array_equal(to_bf16_bits(codes, dtype)[~nan], torch_bf16_bits(ref)[~nan])
    t = to_torch(codes, dtype)
    assert t.dtype == torch_dtype and torch.equal(t.view(torch.uint8), torch.from_numpy(codes))


def test_f16_to_bf16_matches_torch():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = bits.view(np.float16)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ours = to_bf16_bits(x, "F16")
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    assert is_nan_bits(ours[nan]).all()


def test_to_torch_keeps_dtype_and_bits():
    bits = np.array([0x3F80, 0xC000, 0x7F80, 0x0001], np.uint16)
    t = to_torch(bits, "BF16")
    assert t.dtype == torch.bfloat16 and t.tolist() == [1.0, -2.0, float("inf"), bf16_value(1)]
    x = np.arange(4, dtype=np.float32)
    assert to_torch(x, "F32").data_ptr() == x.ctypes.data  # shares memory when it may
    ro = np.frombuffer(x.tobytes(), np.float32)
    assert not ro.flags.writeable and to_torch(ro, "F32").tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtypes,mode", [(("F32", "F32"), CompareMode.bitwise), (("BF16", "F32"), CompareMode.bf16),
                                         (("F32", "BF16"), CompareMode.bf16)])
def test_update_mask_of_float32_pairs_is_the_numpy_rule(engine, dtypes, mode):
    """A float32 side takes a compiled mark when the pair holds no inf or NaN, and the numpy passes
    when it does: the same masks as those passes either way (+-0 pairs included)."""
    rng = np.random.default_rng(18)
    bits = rng.integers(0x3000, 0x3F00, 5000, dtype=np.uint16)
    wide = (bits.astype(np.uint32) << 16) | rng.integers(0, 0x10000, bits.size, dtype=np.uint32)
    moved = np.where(rng.random(bits.size) < 0.3, wide + 0x10000, wide).astype(np.uint32)
    sides = {"BF16": bits, "F32": wide.view(np.float32)}
    a, b = sides[dtypes[0]], (moved.view(np.float32) if dtypes[1] == "F32" else (moved >> 16).astype(np.uint16))
    a, b = a.copy(), b.copy()
    a[0], b[0] = 0, -0.0 if b.dtype == np.float32 else 0x8000  # +0 against -0: the same weight
    for special in (None, 0x7FC00000):
        if special is not None:  # a NaN in the fine-tune
            b[7] = np.uint32(special).view(np.float32) if dtypes[1] == "F32" else np.uint16(special >> 16)
        got = update_mask(a, b, *dtypes, mode)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "compiled", None)
            want = update_mask(a, b, *dtypes, mode)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert 0 < got[0].sum() < a.size and got[1].sum() == (special is not None) and not got[0][0]
