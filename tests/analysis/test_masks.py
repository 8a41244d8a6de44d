"""Mask kinds and set algebra against brute-force numpy references, and the `masks` command."""

import math
from fractions import Fraction

import numpy as np
import pytest
from factory import bump, save, tiny_weights
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from ckptprobe.analysis.mask_expr import Kind, parse_expression
from ckptprobe.analysis.mask_select import (LowThreshold, below_mean, default_rank, keep_count, low_mask,
                                            principal_mask, random_mask, select_largest, select_smallest)
from ckptprobe.analysis.masks import MaskSpec, Vectors, build_masks
from ckptprobe.cli import main
from ckptprobe.errors import TensorMismatchError, UsageError
from ckptprobe.io.maskfile import read_masks
from ckptprobe.io.names import parse_name
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors


# ---------------------------------------------------------------- brute-force references

def ref_select(values, count, largest):
    """Sort by value (descending if `largest`), ties by row-major index; first `count` entries."""
    flat = values.reshape(-1).astype(np.float64)
    order = np.lexsort((np.arange(flat.size), -flat if largest else flat))
    out = np.zeros(flat.size, bool)
    out[order[:count]] = True
    return out.reshape(values.shape)


def ref_count(alpha, n):
    """round-half-up of (the decimal alpha) * n, in exact rational arithmetic."""
    return math.floor(Fraction(repr(alpha)) * n + Fraction(1, 2))


def ref_principal(w, k, alpha):
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)  # full SVD, float64
    recon = (u[:, :k] * s[:k]) @ vt[:k] if k < min(w.shape) else w  # full rank: exactly W (ties stay ties)
    return ref_select(np.abs(recon), keep_count(alpha, w.size), largest=True)


def ref_low(w, alpha, threshold):
    a = np.abs(w.astype(np.float64))
    if threshold == "mean":
        return a < a.mean()
    return ref_select(a, keep_count(alpha, w.size), largest=False)


def bf16(x):
    return bf16_bits_to_float32(float32_to_bf16_bits(np.asarray(x, np.float32)))


# ---------------------------------------------------------------- counting and selection

@pytest.mark.parametrize("alpha, n, expected", [
    (0.05, 1000, 50), (0.15, 10, 2), (0.5, 3, 2), (0.25, 2, 1), (0.05, 30, 2), (0.0, 10, 0), (1.0, 7, 7),
    (1e-9, 1000, 0), (1e-3, 500, 1), (0.3, 10, 3), (0.05, 233_373_696, 11_668_685),
])
def test_keep_count_exact(alpha, n, expected):
    assert keep_count(alpha, n) == expected == ref_count(alpha, n)


@pytest.mark.parametrize("alpha", [-0.01, 1.01, float("nan"), float("inf")])
def test_alpha_out_of_range(alpha):
    with pytest.raises(UsageError, match="outside"):
        keep_count(alpha, 10)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.data())
def test_select_matches_sort_with_ties(values, data):
    v = np.array(values, np.float32).reshape(-1, 1) if len(values) % 2 else np.array(values, np.float32)
    count = data.draw(st.integers(0, v.size))
    for largest, fn in ((True, select_largest), (False, select_smallest)):
        got = fn(v, count)
        assert got.shape == v.shape and got.sum() == count
        assert np.array_equal(got, ref_select(v, count, largest))


def test_ties_go_to_lowest_index():
    v = np.array([[1, 2, 2], [2, 0, 2]], np.float32)
    assert select_largest(v, 2).tolist() == [[False, True, True], [False, False, False]]
    assert select_largest(v, 3).tolist() == [[False, True, True], [True, False, False]]
    assert select_smallest(v, 2).tolist() == [[True, False, False], [False, True, False]]
    assert select_smallest(v, 3).tolist() == [[True, True, False], [False, True, False]]


def test_below_mean_is_exact_where_float32_rounding_would_not_be():
    a = np.array([1.0, 1.0, 1.0 + 2.0 ** -23], np.float32)  # mean 1 + 2^-23/3 rounds to 1.0 in float32
    assert np.float32(a.astype(np.float64).mean()) == 1.0
    assert below_mean(a).tolist() == [True, True, False]
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = np.abs(bf16(rng.standard_normal((40, 30)) * 0.02))
        assert np.array_equal(below_mean(x), x.astype(np.float64) < x.astype(np.float64).mean())


def test_default_rank():
    assert [default_rank(s) for s in [(1536, 1536), (256, 1536), (8960, 1536), (128, 512), (32, 64), (8, 3)]] == \
        [64, 16, 64, 8, 2, 1]


# ---------------------------------------------------------------- kinds vs brute force

@pytest.mark.parametrize("shape, k, alpha", [((48, 32), 2, 0.05), ((32, 64), 8, 0.1), ((40, 40), 40, 0.3),
                                             ((24, 16), 1, 0.0), ((24, 16), 3, 1.0), ((24, 16), 3, 0.002)])
def test_principal_mask_matches_numpy_full_svd(shape, k, alpha):
    rng = np.random.default_rng(sum(shape) + k)
    w = bf16(rng.standard_normal(shape) * 0.02)
    got = principal_mask(w, k, alpha)
    assert got.sum() == keep_count(alpha, w.size)
    assert np.array_equal(got, ref_principal(w, k, alpha))


def test_principal_mask_randomized_route_on_a_tall_matrix():
    """8192 rows: the engine's randomized top-k; a clear spectral gap makes it agree with the full SVD."""
    rng = np.random.default_rng(7)
    low_rank = rng.standard_normal((8192, 4)) @ rng.standard_normal((4, 48))
    w = (low_rank + 0.01 * rng.standard_normal((8192, 48))).astype(np.float32)
    from ckptprobe.analysis.svd import use_randomized

    assert use_randomized(w.shape, 4)
    got, ref = principal_mask(w, 4, 0.05), ref_principal(w, 4, 0.05)
    assert got.sum() == ref.sum() == keep_count(0.05, w.size)
    assert np.count_nonzero(got != ref) <= 2e-4 * w.size
    assert np.array_equal(principal_mask(w, 4, 0.05, method="exact"), ref)


@pytest.mark.parametrize("threshold", ["alpha", "mean"])
@pytest.mark.parametrize("alpha", [0.05, 0.5, 0.0, 1.0])
def test_low_mask_matches_sort_with_bf16_ties(threshold, alpha):
    w = bf16(np.random.default_rng(1).standard_normal((64, 48)) * 0.02)  # bf16: many equal magnitudes
    assert len(np.unique(np.abs(w))) < w.size  # ties exist
    got = low_mask(w, alpha, LowThreshold(threshold))
    assert np.array_equal(got, ref_low(w, alpha, threshold))


def test_random_mask_count_seed_and_name():
    a = random_mask((30, 20), 77, seed=5, name="x")
    assert a.sum() == 77 and a.shape == (30, 20)
    assert np.array_equal(a, random_mask((30, 20), 77, seed=5, name="x"))
    assert not np.array_equal(a, random_mask((30, 20), 77, seed=6, name="x"))
    assert not np.array_equal(a, random_mask((30, 20), 77, seed=5, name="y"))
    # uniform: every row gets about its share over many seeds
    hits = sum(random_mask((10, 10), 30, s, "u") for s in range(200)).astype(float)
    assert abs(hits.mean() - 60) < 1e-9 and hits.std() < 10


# ---------------------------------------------------------------- set algebra

def test_expression_precedence_and_macros():
    p = lambda t: str(parse_expression(t))  # noqa: E731
    assert p("low | principal & update") == "low | (principal & update)"
    assert p("low ^ principal | update") == "(low ^ principal) | update"
    assert p("low & principal ^ update") == "(low & principal) ^ update"
    assert p("~low & principal") == "~low & principal"
    assert p("~(low & principal)") == "~(low & principal)"
    assert p("safe") == "low | ~principal"
    assert p("non-principal") == "~principal"
    assert p(" ( ( low ) ) ") == "low"
    assert parse_expression("safe & update").atoms() == {"low", "principal", "update"}


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_expression_evaluates_like_numpy(seed):
    rng = np.random.default_rng(seed)
    env = {a: rng.random((5, 7)) < 0.5 for a in ("principal", "low", "update", "random", "consensus")}
    P, L, U, R, C = (env[a] for a in ("principal", "low", "update", "random", "consensus"))
    cases = {
        "low | ~principal": L | ~P, "safe": L | ~P, "non-principal": ~P,
        "~(low & principal) ^ update | random": ((~(L & P)) ^ U) | R,
        "consensus & ~(safe ^ random)": C & ~((L | ~P) ^ R), "~~low": L,
    }
    for text, expected in cases.items():
        got = parse_expression(text).evaluate(lambda a: env[a].copy())
        assert np.array_equal(got, expected), text


@pytest.mark.parametrize("text, match", [
    ("", "empty"), ("low |", "ends too early"), ("(low", r"missing '\)'"), ("low low", "unexpected 'low'"),
    ("low + principal", "unexpected '\\+'"), ("princpal", "unknown name 'princpal'"), ("| low", "unexpected"),
    ("low)", r"unexpected '\)'"), ("__import__('os')", "unexpected|unknown"),
])
def test_expression_errors(text, match):
    with pytest.raises(UsageError, match=match):
        parse_expression(text)


# ---------------------------------------------------------------- whole models

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny bf16 base and three fine-tunes with known changed entries, plus one with a wrong shape."""
    root = tmp_path_factory.mktemp("runs")
    w = tiny_weights(0)
    base_bits = {n: float32_to_bf16_bits(x) for n, x in w.items()}
    save(root / "base.safetensors", {n: bf16_bits_to_float32(b) for n, b in base_bits.items()})
    changed = []
    for r in range(3):
        rng = np.random.default_rng(10 + r)
        ch = {n: rng.random(x.shape) < 0.3 for n, x in w.items()}
        save(root / f"ft{r}.safetensors", {n: bf16_bits_to_float32(bump(base_bits[n], ch[n])) for n in w})
        changed.append(ch)
    bad = dict(w)
    bad["model.layers.0.mlp.up_proj.weight"] = np.zeros((64, 31), np.float32)
    save(root / "bad.safetensors", bad)
    return root, {n: bf16_bits_to_float32(b) for n, b in base_bits.items()}, changed


def test_safe_mask_per_matrix_against_brute_force(runs):
    root, w, _ = runs
    spec = MaskSpec("safe", alpha=0.05, low_threshold=LowThreshold.mean)
    r = build_masks(open_source(str(root / "base.safetensors")), spec, kind="safe", vectors=Vectors.freeze)
    by_name = {t.name: t for t in r.tensors}
    assert list(by_name) == list(w)
    for name, x in w.items():
        t = by_name[name]
        got = np.unpackbits(t.bits, count=x.size, bitorder="little").astype(bool).reshape(x.shape)
        if x.ndim == 2:
            k = default_rank(x.shape)
            expected = ref_low(x, 0.05, "mean") | ~ref_principal(x, k, 0.05)
            assert t.computed and t.rank == k
        else:
            expected = np.zeros(x.shape, bool)  # --vectors freeze
            assert not t.computed and t.rank is None
        assert np.array_equal(got, expected), name
        assert t.count == expected.sum()
    assert r.recipe["expression"] == "low | ~principal" and r.recipe["low_threshold"] == "mean"
    assert r.recipe["k"] == "auto" and r.recipe["vectors"] == "freeze" and "seed" not in r.recipe


def test_update_consensus_and_random_kinds(runs):
    root, w, changed = runs
    base = open_source(str(root / "base.safetensors"))
    fts = [open_source(str(root / f"ft{r}.safetensors")) for r in range(3)]
    upd = build_masks(base, MaskSpec("update"), fts[:1], vectors=Vectors.train)
    cons = build_masks(base, MaskSpec("consensus", min_agree=0.6), fts, vectors=Vectors.train)
    safe = build_masks(base, MaskSpec("safe"), vectors=Vectors.train)
    rand = build_masks(base, MaskSpec("random", like="safe", seed=3), vectors=Vectors.train)
    assert cons.recipe["min_runs"] == 2 and rand.recipe["like"] == "safe" and rand.recipe["seed"] == 3
    for i, name in enumerate(w):
        if w[name].ndim != 2:
            assert upd.tensors[i].count == w[name].size  # --vectors train
            continue
        unpacked = lambda t: np.unpackbits(t.bits, count=w[name].size, bitorder="little").astype(bool)  # noqa: E731
        assert np.array_equal(unpacked(upd.tensors[i]), changed[0][name].reshape(-1))
        votes = sum(c[name].astype(int) for c in changed).reshape(-1)
        assert np.array_equal(unpacked(cons.tensors[i]), votes >= 2)
        assert rand.tensors[i].count == safe.tensors[i].count  # same density per matrix, other positions
        assert not np.array_equal(unpacked(rand.tensors[i]), unpacked(safe.tensors[i]))


@pytest.mark.parametrize("min_agree, runs_needed", [(1.0, 3), (0.67, 3), (0.66, 2), (0.3, 1), (0.01, 1)])
def test_consensus_rounding(min_agree, runs_needed):
    assert MaskSpec("consensus", min_agree=min_agree).needed_runs(3) == runs_needed
    assert MaskSpec("consensus", min_agree=0.3).needed_runs(10) == 3  # 0.3 * 10 is 3.0000000000000004


def test_build_errors(runs):
    root, _, _ = runs
    base = open_source(str(root / "base.safetensors"))
    ft = [open_source(str(root / f"ft{r}.safetensors")) for r in range(2)]
    bad = open_source(str(root / "bad.safetensors"))
    cases = [
        (UsageError, "say whether they train", dict(spec=MaskSpec("low"))),
        (UsageError, "outside", dict(spec=MaskSpec("low", alpha=1.5), vectors=Vectors.train)),
        (UsageError, "at least 1", dict(spec=MaskSpec("principal", rank=0), vectors=Vectors.train)),
        (UsageError, "k=33 is larger than the smaller side of every selected matrix", dict(spec=MaskSpec("principal", rank=33), vectors=Vectors.train)),
        (UsageError, "exactly one --from", dict(spec=MaskSpec("update"), runs=ft, vectors=Vectors.train)),
        (UsageError, "at least two", dict(spec=MaskSpec("consensus"), runs=ft[:1], vectors=Vectors.train)),
        (UsageError, "needs --like", dict(spec=MaskSpec("random"), vectors=Vectors.train)),
        (UsageError, "only read by", dict(spec=MaskSpec("low"), runs=ft[:1], vectors=Vectors.train)),
        (UsageError, "nothing to compute", dict(spec=MaskSpec("low"), include=["*norm*"], vectors=Vectors.train)),
        (TensorMismatchError, r"has shape \(64, 31\)",
         dict(spec=MaskSpec("update"), runs=[bad], vectors=Vectors.train)),
    ]
    for exc, match, kwargs in cases:
        spec = kwargs.pop("spec")
        with pytest.raises(exc, match=match):
            build_masks(base, spec, **kwargs)


def test_include_exclude_follow_vectors(runs):
    root, w, _ = runs
    r = build_masks(open_source(str(root / "base.safetensors")), MaskSpec("low"), include=["*.mlp.*"],
                    vectors=Vectors.train)
    for t in r.tensors:
        assert t.computed == (".mlp." in t.name)
        if not t.computed:
            assert t.count == t.numel
        else:
            assert t.count == keep_count(0.05, t.numel)


# ---------------------------------------------------------------- command line

def test_info_against_a_base_names_weights_without_a_mask_never_buffers(tmp_path, capsys):
    w = tiny_weights(0)
    base = tmp_path / "base.safetensors"
    write_safetensors(base, {**{n: ("F32", x) for n, x in w.items()},
                             "model.position_ids": ("I64", np.arange(8, dtype=np.int64)[None])})
    out = tmp_path / "m.safetensors"
    assert main(["masks", str(base), "--kind", "low", "--vectors", "train", "-o", str(out)]) == 0
    assert main(["masks", "info", str(out), "--base", str(base)]) == 0
    assert "no mask" not in capsys.readouterr().err  # the int64 buffer is not a weight
    headless = tmp_path / "headless.safetensors"  # the same model without its lm_head: a weight with no mask
    write_safetensors(headless, {n: ("F32", x) for n, x in w.items() if n != "lm_head.weight"})
    part = tmp_path / "part.safetensors"
    assert main(["masks", str(headless), "--kind", "low", "--vectors", "train", "-o", str(part)]) == 0
    capsys.readouterr()
    assert main(["masks", "info", str(part), "--base", str(base)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "1 tensor(s) of " in err and "e.g. lm_head.weight" in err


def test_cli_build_and_info_round_trip(runs, tmp_path, capsys):
    root, w, changed = runs
    base, out = str(root / "base.safetensors"), tmp_path / "m.safetensors"
    assert main(["masks", base, "--kind", "safe", "--vectors", "train", "-o", str(out)]) == 0
    mf = read_masks(out)
    assert mf.recipe["kind"] == "safe" and set(mf.keys()) == set(w)
    assert "Mask low | ~principal" in capsys.readouterr().out  # the summary table
    assert main(["masks", "info", str(out), "--base", base, "-f", "json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["checked_against"] == base
    total = sum(mf.count(n) for n in mf.keys())
    assert data["total"]["trainable"] == total and data["total"]["numel"] == sum(x.size for x in w.values())
    mods = {g["module"]: g for g in data["groups"]["module"]}
    assert mods["norm"]["density"] == 1.0 and mods["q"]["tensors"] == 2
    # `masks build` is the same command; --from takes several values
    c = tmp_path / "c.safetensors"
    assert main(["masks", "build", base, "--kind", "consensus", "--from", str(root / "ft0.safetensors"),
                 str(root / "ft1.safetensors"), "--vectors", "freeze", "-o", str(c)]) == 0
    assert read_masks(c).recipe["from"] == [str(root / "ft0.safetensors"), str(root / "ft1.safetensors")]
    name = "model.layers.1.mlp.down_proj.weight"
    assert np.array_equal(read_masks(c).mask(name), changed[0][name] & changed[1][name])
    # --by: the table's rows, here per layer, counted from the file's bits
    lm = tmp_path / "l.safetensors"
    capsys.readouterr()
    assert main(["masks", base, "--kind", "low", "--vectors", "train", "--by", "layer", "-o", str(lm)]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[0] != "layer":
            rows[cells[0]] = cells[3].replace(",", "")
    expected = {}
    for n in read_masks(lm).keys():
        layer = parse_name(n).layer
        key = "-" if layer is None else str(layer)
        expected[key] = expected.get(key, 0) + read_masks(lm).count(n)
    assert rows == {k: str(v) for k, v in expected.items()} and len(rows) > 2
    # --expr, and random with the per-matrix density of an expression
    e, r = tmp_path / "e.safetensors", tmp_path / "r.safetensors"
    assert main(["masks", base, "--expr", "low & ~principal", "-x", "*embed*", "--vectors", "freeze",
                 "-o", str(e)]) == 0
    assert main(["masks", base, "--kind", "random", "--like", "low & ~principal", "--seed", "2", "-x", "*embed*",
                 "--vectors", "freeze", "-o", str(r)]) == 0
    me, mr = read_masks(e), read_masks(r)
    assert me.recipe["kind"] == "expression" and me.recipe["expression"] == "low & ~principal"
    assert mr.recipe["like"] == "low & ~principal" and mr.recipe["seed"] == 2
    assert me.count("model.embed_tokens.weight") == mr.count("model.embed_tokens.weight") == 0  # excluded: frozen
    assert me.tensors["model.embed_tokens.weight"]["computed"] is False
    for n in me.keys():
        assert me.count(n) == mr.count(n)
        if me.count(n):
            assert not np.array_equal(me.mask(n), mr.mask(n))


@pytest.mark.parametrize("args, code, match", [
    (["--kind", "safe", "--alpha", "1.5", "--vectors", "train"], 2, r"--alpha: must be a fraction in \(0, 1\], got 1.5"),
    (["--expr", "low | princpal", "--vectors", "train"], 2, "unknown name 'princpal'"),
    (["--kind", "low", "--expr", "low", "--vectors", "train"], 2, "exactly one of --kind and --expr"),
    (["--kind", "low"], 2, "--vectors"),
    (["--kind", "principal", "-k", "40", "--vectors", "train"], 2, "-k 40 is larger than the smaller side"),
    (["--kind", "low", "--like", "safe", "--vectors", "train"], 2, "only read by the random kind"),
    (["--kind", "update", "--from", "{root}/bad.safetensors", "--vectors", "train"], 1, r"shape \(64, 31\)"),
])
def test_cli_errors_are_one_line(runs, tmp_path, capsys, args, code, match):
    root, _, _ = runs
    args = [a.format(root=root) for a in args]
    assert main(["masks", str(root / "base.safetensors"), *args, "-o", str(tmp_path / "m.safetensors")]) == code
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and len([ln for ln in err.splitlines() if ln.startswith("Error")]) == 1
    import re

    assert re.search(match, err)
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_info_refuses_mismatch_and_truncation(runs, tmp_path, capsys):
    root, _, _ = runs
    out = tmp_path / "m.safetensors"
    assert main(["masks", str(root / "base.safetensors"), "--kind", "low", "--vectors", "train", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["masks", "info", str(out), "--base", str(root / "ft0.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "differs from the base the mask was computed on" in err
    assert main(["masks", "info", str(out), "--base", str(root / "bad.safetensors")]) == 1
    assert "mask shape (64, 32) != model shape (64, 31)" in capsys.readouterr().err
    (tmp_path / "t.safetensors").write_bytes(out.read_bytes()[:-3])
    assert main(["masks", "info", str(tmp_path / "t.safetensors")]) == 1
    assert "truncated" in capsys.readouterr().err


def test_kind_names_are_parseable():
    for k in Kind:
        assert parse_expression(k.value).atoms() <= {"principal", "low", "random", "update", "consensus"}
    assert math.isclose(MaskSpec("safe").alpha, 0.05)


def test_cli_topk_method_exact_is_recorded(runs, tmp_path):
    root, w, _ = runs
    out = tmp_path / "p.safetensors"
    assert main(["masks", str(root / "base.safetensors"), "--kind", "principal", "--topk-method", "exact",
                 "-k", "3", "--vectors", "freeze", "-o", str(out)]) == 0
    mf = read_masks(out)
    assert mf.recipe["topk_method"] == "exact" and mf.recipe["k"] == 3
    name = "model.layers.0.mlp.gate_proj.weight"
    assert np.array_equal(mf.mask(name), ref_principal(w[name], 3, 0.05)) and mf.tensors[name]["rank"] == 3


def test_info_accepts_a_base_saved_in_another_float_dtype(runs, tmp_path, capsys):
    root, w, changed = runs
    save(tmp_path / "base32.safetensors", w, dtype="F32")  # the bf16 base's values, stored as fp32
    ft0 = {n: x.copy() for n, x in w.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    ft0[name] = bf16(w[name] * 1.5)
    save(tmp_path / "other32.safetensors", ft0, dtype="F32")
    out = tmp_path / "m.safetensors"
    assert main(["masks", str(root / "base.safetensors"), "--kind", "low", "--vectors", "train", "-o", str(out)]) == 0
    assert main(["masks", "info", str(out), "--base", str(tmp_path / "base32.safetensors")]) == 0
    capsys.readouterr()
    assert main(["masks", "info", str(out), "--base", str(tmp_path / "other32.safetensors")]) == 1
    assert f"{name}: the model's tensor differs" in capsys.readouterr().err


def test_cli_matrices_smaller_than_k_are_said_to_follow_vectors(tmp_path, capsys):
    """-k above a matrix's smaller side: that matrix gets no principal mask but --vectors, and stderr says so."""
    rng = np.random.default_rng(3)
    w = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
         "model.layers.0.mlp.down_proj.weight": rng.standard_normal((2, 5)).astype(np.float32)}
    base = save(tmp_path / "base.safetensors", w)
    out = tmp_path / "m.safetensors"
    assert main(["masks", str(base), "--kind", "principal", "-k", "3", "--vectors", "train", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Warning: 1 matrix smaller than k: no computed mask, --vectors train instead (e.g. " \
           "model.layers.0.mlp.down_proj.weight, shape (2, 5): smaller side 2 < k=3)" in err
    mf = read_masks(out)
    assert mf.tensors["model.layers.0.mlp.down_proj.weight"]["computed"] is False
    assert mf.count("model.layers.0.mlp.down_proj.weight") == 10
    assert mf.count("model.layers.0.mlp.up_proj.weight") == keep_count(0.05, 128)
