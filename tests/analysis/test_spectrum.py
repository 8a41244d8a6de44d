"""`spectrum` against known answers and independent references (numpy SVD in float64,
scipy.linalg.subspace_angles), and the `ckptprobe spectrum` command.

Tolerances: matrices stored in F32 are compared with the float64 SVD of the stored values:
NSS to 1e-5 relative, angles to 0.01 degrees (fp32 top-k subspaces of matrices with a clear
gap at k move by ~eps * s_1 / gap ~ 1e-5 degrees). BF16 checkpoints use the same tolerances
against the float64 SVD of the dequantized bf16 values, since the engine upcasts them exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from factory import save
from typer.testing import CliRunner

from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from ckptprobe.analysis.spectrum import default_k, principal_angles, spectrum
from ckptprobe.analysis.svd import TopkMethod
from ckptprobe.cli import main
from ckptprobe.cli._app import app
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: a second one is ~10x slower on this shared, oversubscribed machine (see test_svd)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def orthonormal(m: int, r: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q.numpy()


def gapped(m: int, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(W, U, s, V) float64 with a clear gap after the k-th singular value: s_1..s_k in [7, 10], the rest <= 2."""
    r = min(m, n)
    s = np.concatenate([np.linspace(10, 7, k), np.linspace(2, 0.1, r - k)])
    u, v = orthonormal(m, r, seed), orthonormal(n, r, seed + 1)
    return (u * s) @ v.T, u, s, v


def run(tmp_path, base: dict, fts: list[dict], dtype="F32", **kw):
    paths = [save(tmp_path / "base.safetensors", {n: x.astype(np.float32) for n, x in base.items()}, dtype)]
    for i, ft in enumerate(fts):
        paths.append(save(tmp_path / f"ft{i}.safetensors", {n: x.astype(np.float32) for n, x in ft.items()}, dtype))
    return spectrum(open_source(str(paths[0])), [open_source(str(p)) for p in paths[1:]], **kw)


def reference(w0: np.ndarray, w1: np.ndarray, k: int) -> dict:
    """Independent float64 answers: numpy SVD + scipy principal angles."""
    u0, s0, vh0 = np.linalg.svd(w0.astype(np.float64), full_matrices=False)
    u1, s1, vh1 = np.linalg.svd(w1.astype(np.float64), full_matrices=False)
    return {"nss": np.linalg.norm(s1 - s0) / np.linalg.norm(s0),
            "energy": (s1[:k].sum() - s0[:k].sum()) / s0[:k].sum(),
            "angles_u": np.sort(np.degrees(scipy.linalg.subspace_angles(u0[:, :k], u1[:, :k]))),
            "angles_v": np.sort(np.degrees(scipy.linalg.subspace_angles(vh0[:k].T, vh1[:k].T))), "s0": s0, "s1": s1}


def rotation(m: int, a: np.ndarray, b: np.ndarray, degrees: float) -> np.ndarray:
    """(m, m) rotation by `degrees` in the plane of orthonormal a, b (identity on the rest)."""
    t = math.radians(degrees)
    plane = np.outer(a, a) + np.outer(b, b)
    return np.eye(m) + (math.cos(t) - 1) * plane + math.sin(t) * (np.outer(b, a) - np.outer(a, b))


# ---- known answers ----

def test_rotating_the_left_space_by_a_known_angle(tmp_path):
    """W1 = R W0 with R turning u_1 towards u_40 (outside the top-4) by 12 degrees: one left angle of
    12 degrees, three of 0, right subspace and singular values unchanged."""
    w0, u, s, v = gapped(40, 40, 4, seed=1)
    w1 = rotation(40, u[:, 0], u[:, 39], 12.0) @ w0
    wr = w0 @ rotation(40, v[:, 1], v[:, 20], 30.0).T  # and one turning v_2 by 30 degrees
    r = run(tmp_path, {Q: w0}, [{Q: w1}, {Q: wr}], k=4)
    (m,) = r.matrices
    rot_u, rot_v = m.comparisons
    np.testing.assert_allclose(rot_u.angles_u, [0, 0, 0, 12], atol=1e-3)
    np.testing.assert_allclose(rot_u.angles_v, 0, atol=1e-3)
    np.testing.assert_allclose(rot_v.angles_v, [0, 0, 0, 30], atol=1e-3)
    np.testing.assert_allclose(rot_v.angles_u, 0, atol=1e-3)
    for c in (rot_u, rot_v):
        assert abs(c.nss) < 1e-6 and abs(c.topk_energy_change) < 1e-6
    assert rot_u.max_angle_u == pytest.approx(12, abs=1e-3) and rot_u.mean_angle_u == pytest.approx(3, abs=1e-3)


def test_adding_a_rank_one_term_changes_what_theory_says(tmp_path):
    """W1 = W0 + c u_1 v_1^T: s_1 grows by c, nothing else moves; ||dW||_2 = c and Weyl is tight.
    W2 = W0 + c u_{k+1} v_{k+1}^T (s_{k+1} + c stays between s_{k+2} and s_k, so the order holds):
    NSS moves, top-k energy does not."""
    k, c = 4, 0.75
    w0, u, s, v = gapped(30, 50, k, seed=2)
    w1 = w0 + c * np.outer(u[:, 0], v[:, 0])
    w2 = w0 + c * np.outer(u[:, k], v[:, k])
    r = run(tmp_path, {Q: w0}, [{Q: w1}, {Q: w2}], k=k, bounds=True)
    top, tail = r.matrices[0].comparisons
    norm_s = np.linalg.norm(s)
    assert top.nss == pytest.approx(c / norm_s, rel=1e-5)
    assert top.topk_energy_change == pytest.approx(c / s[:k].sum(), rel=1e-5)
    np.testing.assert_allclose(top.angles_u + top.angles_v, 0, atol=1e-3)
    assert top.bounds.dw_norm2 == pytest.approx(c, rel=1e-5)
    assert top.bounds.weyl_max_shift == pytest.approx(c, rel=1e-4)  # Weyl's bound is attained
    assert top.bounds.gap_k == pytest.approx(s[k - 1] - s[k], rel=1e-5)
    assert tail.nss == pytest.approx(c / norm_s, rel=1e-5)
    assert abs(tail.topk_energy_change) < 1e-6
    np.testing.assert_allclose(tail.angles_u + tail.angles_v, 0, atol=1e-3)


# ---- against numpy/scipy on SFT-like updates, fp32 and bf16, batched and chunked ----

def sft_like(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for i in range(3):  # three layers: same-shape matrices are batched together
        for name, (m, n) in ((f"model.layers.{i}.self_attn.q_proj.weight", (24, 24)),
                             (f"model.layers.{i}.mlp.up_proj.weight", (40, 24)),
                             (f"model.layers.{i}.mlp.down_proj.weight", (24, 40))):
            w, *_ = gapped(m, n, 4, seed=seed + 10 * i + m)
            base[name] = w * 0.05
            ft[name] = base[name] + 0.02 * 0.05 * rng.standard_normal((m, n))
    return base, ft


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_matches_numpy_and_scipy(tmp_path, dtype):
    base, ft = sft_like(3)
    r = run(tmp_path, base, [ft], dtype=dtype, k=4, max_memory=1 << 40)
    chunked = run(tmp_path, base, [ft], dtype=dtype, k=4, max_memory=1)  # one matrix per SVD call
    stored = (lambda x: bf16_bits_to_float32(float32_to_bf16_bits(x.astype(np.float32)))) if dtype == "BF16" \
        else (lambda x: x.astype(np.float32))
    assert [m.name for m in r.matrices] == list(base)
    for m, mc in zip(r.matrices, chunked.matrices):
        ref = reference(stored(base[m.name]), stored(ft[m.name]), 4)
        (c,) = m.comparisons
        assert c.nss == pytest.approx(ref["nss"], rel=1e-4)
        assert c.topk_energy_change == pytest.approx(ref["energy"], rel=1e-3, abs=1e-7)
        np.testing.assert_allclose(c.angles_u, ref["angles_u"], atol=0.01)
        np.testing.assert_allclose(c.angles_v, ref["angles_v"], atol=0.01)
        np.testing.assert_allclose(m.base_values, ref["s0"], rtol=0, atol=1e-5 * ref["s0"][0])
        assert list(c.angles_u) == sorted(c.angles_u) and len(c.angles_u) == 4
        assert mc.comparisons[0].nss == pytest.approx(c.nss, rel=1e-6)
        np.testing.assert_allclose(mc.comparisons[0].angles_u, c.angles_u, atol=1e-4)


def test_principal_angles_match_scipy_on_small_and_large_angles():
    a = orthonormal(50, 6, seed=4)
    b = orthonormal(50, 6, seed=5)  # unrelated: large angles
    near = torch.linalg.qr(torch.from_numpy(a + 1e-4 * b)).Q.numpy()  # tiny angles, where arccos fails
    for x, y in ((a, b), (a, near)):
        got = principal_angles(x[None], y[None])[0]
        np.testing.assert_allclose(got, np.sort(np.degrees(scipy.linalg.subspace_angles(x, y))), atol=1e-9)


def test_bounds_hold(tmp_path):
    base, ft = sft_like(6)
    r = run(tmp_path, base, [ft], k=4, bounds=True)
    for m in r.matrices:
        b = m.comparisons[0].bounds
        assert b.weyl_max_shift <= b.dw_norm2 * (1 + 1e-5)
        assert max(m.comparisons[0].max_angle_u, m.comparisons[0].max_angle_v) <= b.wedin_bound_deg + 1e-3
        assert 0 < b.wedin_bound_deg < 90  # the gap is clear: a non-vacuous bound


def test_large_matrix_routes_exact_randomized_and_fast(tmp_path):
    """A large tall matrix: exact by QR first (auto), randomized when asked, randomized top-k only
    with --fast; all three against numpy/scipy."""
    name = "model.embed_tokens.weight"
    w0 = orthonormal(8192, 32, seed=7) * (0.8 ** np.arange(32)) @ orthonormal(32, 32, seed=8).T
    w1 = w0 + 1e-3 * np.random.default_rng(9).standard_normal(w0.shape)
    exact = reference(w0.astype(np.float32), w1.astype(np.float32), 6)
    for method, randomized in ((TopkMethod.auto, False), (TopkMethod.randomized, True)):
        (m,) = run(tmp_path, {name: w0}, [{name: w1}], k=6, method=method).matrices
        c = m.comparisons[0]
        assert m.randomized == randomized and c.nss_scope == "all"
        assert c.nss == pytest.approx(exact["nss"], rel=1e-4)
        np.testing.assert_allclose(c.angles_u, exact["angles_u"], atol=0.01)
        np.testing.assert_allclose(c.angles_v, exact["angles_v"], atol=0.01)
    (m,) = run(tmp_path, {name: w0}, [{name: w1}], k=6, fast=True).matrices
    fast = m.comparisons[0]
    top = exact["s1"][:6] - exact["s0"][:6]
    assert m.randomized and fast.nss_scope == "top-k" and len(m.base_values) == 6
    np.testing.assert_allclose(fast.angles_u, exact["angles_u"], atol=0.01)
    assert fast.nss == pytest.approx(np.linalg.norm(top) / np.linalg.norm(exact["s0"][:6]), rel=1e-3)


# ---- several fine-tunes, grouping, defaults ----

def test_several_finetunes_and_grouping(tmp_path):
    base, sft = sft_like(10)
    rl = {n: base[n] + 0.01 * (sft[n] - base[n]) for n in base}  # the same update, 100x smaller
    r = run(tmp_path, base, [sft, rl], k=4)
    rows = r.rows()
    assert len(rows) == 2 * len(base)
    assert [row["finetuned"] for row in rows[:2]] == list(r.finetuned)
    assert all(row_sft["nss"] > 10 * row_rl["nss"] for row_sft, row_rl in zip(rows[::2], rows[1::2]))
    by_module = {(g["module"], g["finetuned"]): g for g in r.rows("module")}
    assert by_module["up", r.finetuned[0]]["matrices"] == 3
    assert [g["layer"] for g in r.rows("layer")] == [0, 0, 1, 1, 2, 2]
    assert [(g["group"], g["finetuned"]) for g in r.rows("group")] == [
        (g, ft) for g in ("attention", "mlp") for ft in r.finetuned]


@pytest.mark.parametrize("by", ["module", "layer", "group"])
def test_group_rows_pool_like_brute_force(tmp_path, by):
    """Group rows against float64 numpy SVDs of the stored matrices: NSS over the group's singular values
    together, top-k energy change of the summed energies, largest angle, mean of all angles."""
    from ckptprobe.analysis.grouping import order
    from ckptprobe.io.names import parse_name

    base, sft = sft_like(10)
    rl = {n: base[n] + 0.01 * (sft[n] - base[n]) for n in base}
    r = run(tmp_path, base, [sft, rl], k=4)
    members: dict = {}
    for n in base:
        members.setdefault(getattr(parse_name(n), by), []).append(n)
    rows = r.rows(by)
    assert [g[by] for g in rows[::2]] == sorted(members, key=lambda k: order(by, k))
    f32 = (lambda x: x.astype(np.float32))
    for g in rows:
        ft = (sft, rl)[r.finetuned.index(g["finetuned"])]
        refs = [reference(f32(base[n]), f32(ft[n]), 4) for n in members[g[by]]]
        s0, s1 = np.concatenate([x["s0"] for x in refs]), np.concatenate([x["s1"] for x in refs])
        assert g["matrices"] == len(refs) and g["nss_scope"] == "all"
        assert g["nss"] == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(s0), rel=1e-4, abs=1e-7)  # fp32
        kf0, kf1 = sum(x["s0"][:4].sum() for x in refs), sum(x["s1"][:4].sum() for x in refs)
        assert g["topk_energy_change"] == pytest.approx((kf1 - kf0) / kf0, rel=1e-3, abs=1e-7)
        for side in ("u", "v"):
            angles = np.concatenate([x[f"angles_{side}"] for x in refs])
            assert g[f"max_angle_{side}"] == pytest.approx(angles.max(), abs=0.01)
            assert g[f"mean_angle_{side}"] == pytest.approx(angles.mean(), abs=0.01)
    total = r.total
    assert total[r.finetuned[0]]["matrices"] == len(base)
    assert total[r.finetuned[1]]["nss"] < total[r.finetuned[0]]["nss"] / 10


def test_default_k():
    assert default_k((1536, 8960)) == 64 and default_k((32, 64)) == 8 and default_k((3, 2)) == 1


def test_bitwise_identical_matrices_give_exact_zeros_without_an_svd(tmp_path, monkeypatch):
    """A checkpoint against itself: every metric exactly 0, the base's values, and the fine-tune
    is never decomposed; a one-entry change in one matrix gives that matrix the reference's angles."""
    import ckptprobe.analysis.spectrum as spectrum_module

    base = {Q: gapped(20, 16, 4, seed=21)[0], UP: gapped(20, 16, 4, seed=22)[0], DOWN: gapped(16, 20, 4, seed=23)[0]}
    one = dict(base, **{UP: base[UP].copy()})
    one[UP][3, 4] += 0.5
    batches = []
    decompose = spectrum_module.decompose
    monkeypatch.setattr(spectrum_module, "decompose",
                        lambda w, req, dev: batches.append(len(w)) or decompose(w, req, dev))
    r = run(tmp_path, base, [base, one], k=4, bounds=True)
    assert sorted(batches) == [1, 1, 1, 2]  # the base's two shapes, the changed UP and its dW: nothing else
    for m in r.matrices:
        same, other = m.comparisons
        assert (same.nss, same.topk_energy_change) == (0.0, 0.0) and same.error is None
        assert same.angles_u == same.angles_v == (0.0,) * 4
        assert np.array_equal(same.values, m.base_values)
        assert same.bounds.dw_norm2 == same.bounds.weyl_max_shift == same.bounds.wedin_bound_deg == 0.0
        if m.name != UP:
            assert other == dataclasses.replace(same, finetuned=r.finetuned[1])
            continue
        ref = reference(base[UP].astype(np.float32), one[UP].astype(np.float32), 4)
        assert min(ref["angles_u"].max(), ref["angles_v"].max()) > 1  # degrees: a real change
        assert other.max_angle_u == pytest.approx(ref["angles_u"].max(), abs=0.01)
        assert other.max_angle_v == pytest.approx(ref["angles_v"].max(), abs=0.01)
        assert other.nss == pytest.approx(ref["nss"], rel=1e-5) and other.nss > 0
        assert other.bounds.dw_norm2 == pytest.approx(0.5, rel=1e-6)


def test_bitwise_identity_is_bits_not_values(tmp_path):
    """-0.0 and +0.0 compare equal as numbers but are a change of bits: that matrix is decomposed
    (and, having the same values, still gives angles of about 0)."""
    w0, *_ = gapped(20, 16, 4, seed=24)
    w0[0, 0] = 0.0
    w1 = w0.copy()
    w1[0, 0] = -0.0
    c = run(tmp_path, {Q: w0}, [{Q: w1}], k=4).matrices[0].comparisons[0]
    assert c.error is None and c.max_angle_u < 1e-3 and c.nss < 1e-6


# ---- bad input ----

def test_skips_non_matrices_and_reports_nonfinite(tmp_path):
    w0, *_ = gapped(20, 20, 4, seed=12)
    bad_ft, bad_base = w0.copy(), w0.copy()
    bad_ft[3, 4] = np.nan
    bad_base[0, 0] = np.inf
    items = {"model.norm.weight": ("F32", np.ones(20, np.float32)),
             "conv.weight": ("F32", np.zeros((2, 3, 4), np.float32)),
             "steps": ("I64", np.zeros((3, 3), np.int64))}
    for who, mats in (("base", {Q: w0, UP: w0, DOWN: bad_base}), ("ft", {Q: w0 * 1.01, UP: bad_ft, DOWN: w0})):
        write_safetensors(tmp_path / f"{who}.safetensors",
                          items | {n: ("F32", x.astype(np.float32)) for n, x in mats.items()})
    r = spectrum(open_source(str(tmp_path / "base.safetensors")), [open_source(str(tmp_path / "ft.safetensors"))], k=4)
    reasons = {s.name: s.reason for s in r.skipped}
    assert reasons == {"model.norm.weight": "1-D, not a matrix",
                       "conv.weight": "3-D (2, 3, 4), not a matrix or an expert stack",
                       "steps": "int64 buffer, not a weight"}
    by_name = {m.name: m.comparisons[0] for m in r.matrices}
    assert by_name[Q].error is None and by_name[Q].nss == pytest.approx(0.01, rel=1e-4)  # W1 = 1.01 W0
    assert by_name[UP].error == "fine-tune has NaN/inf entries" and by_name[UP].nss is None
    assert by_name[DOWN].error == "base has NaN/inf entries" and by_name[DOWN].angles_u == ()
    json.dumps(r.to_dict())  # no NaN objects leak into the JSON structure


def test_k_too_large_skips_that_matrix_only(tmp_path):
    w0, *_ = gapped(20, 12, 2, seed=13)
    w1, *_ = gapped(20, 16, 2, seed=14)
    r = run(tmp_path, {Q: w0, UP: w1}, [{Q: w0, UP: w1}], k=13)
    assert [m.name for m in r.matrices] == [UP] and r.matrices[0].k == 13
    assert [(s.name, s.category.value, s.reason) for s in r.skipped] == [
        (Q, "small", "shape (20, 12): smaller side 12 < k=13")]


# ---- the command ----

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectrum_cli")
    base, sft = sft_like(20)
    base["model.norm.weight"] = np.ones(24)
    sft["model.norm.weight"] = np.ones(24)
    rl = {n: base[n] + 0.05 * (sft[n] - base[n]) for n in base}
    paths = {}
    for name, w in (("base", base), ("sft", sft), ("rl", rl)):
        paths[name] = str(save(root / f"{name}.safetensors", {n: x.astype(np.float32) for n, x in w.items()}))
    return paths


def invoke(*args):
    return CliRunner().invoke(app, ["spectrum", *args], catch_exceptions=False)


def test_cli_json_with_several_finetunes(ckpts):
    res = invoke(ckpts["base"], ckpts["sft"], ckpts["rl"], "-k", "4", "--format", "json", "--singular-values")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["finetuned"] == [ckpts["sft"], ckpts["rl"]] and len(data["matrices"]) == 18
    entry = data["matrices"][0]
    for key in ("name", "finetuned", "layer", "module", "shape", "k", "nss", "angles_u", "angles_v",
                "max_angle_u", "max_angle_v", "topk_energy_change"):
        assert key in entry
    assert entry["k"] == 4 and len(entry["angles_u"]) == 4 and entry["angles_u"] == sorted(entry["angles_u"])
    assert len(entry["singular_values"]) == min(entry["shape"]) == len(entry["singular_values_base"])
    assert [s["name"] for s in data["skipped"]] == ["model.norm.weight"]
    assert {g["module"] for g in data["groups"]["module"]} == {"q", "up", "down"}


def test_cli_json_checkpoint_against_itself_is_exactly_zero(ckpts):
    res = invoke(ckpts["base"], ckpts["base"], "-k", "4", "--format", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["matrices"]
    assert len(rows) == 9
    for row in rows:
        assert row["nss"] == row["topk_energy_change"] == row["max_angle_u"] == row["max_angle_v"] == 0
        assert row["angles_u"] == row["angles_v"] == [0.0] * 4 and row["error"] is None


def test_cli_table_csv_bounds_and_plot(ckpts, tmp_path):
    res = invoke(ckpts["base"], ckpts["rl"], "--by", "module")
    assert res.exit_code == 0 and "max_angle_u" in res.stdout and "down" in res.stdout
    res = invoke(ckpts["base"], ckpts["sft"], ckpts["rl"], "-k", "4", "--by", "group", "-f", "csv")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split(",")[:3] == ["group", "finetuned", "matrices"]
    assert [line.split(",")[:2] for line in lines[1:]] == [[g, ft] for g in ("attention", "mlp")
                                                            for ft in (ckpts["sft"], ckpts["rl"])]
    res = invoke(ckpts["base"], ckpts["rl"], "-k", "3", "--format", "csv", "--bounds", "--device", "cpu")
    assert res.exit_code == 0
    header = res.stdout.splitlines()[0].split(",")
    assert {"nss", "angles_u", "dw_norm2", "weyl_max_shift", "wedin_bound_deg"} <= set(header)
    assert "singular_values" not in header
    png = tmp_path / "spectrum.png"
    res = invoke(ckpts["base"], ckpts["sft"], ckpts["rl"], "--plot", str(png), "--layer", "2",
                 "-o", str(tmp_path / "t.txt"))
    assert res.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert "Spectrum of" in (tmp_path / "t.txt").read_text()


def test_cli_errors_are_one_line(ckpts, capsys, monkeypatch):
    # every matrix too small for k: nothing compared, said in one line; --verbose lists why, tensor by tensor
    assert main(["spectrum", ckpts["base"], ckpts["rl"], "-k", "30", "-f", "json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["Error: no matrix was compared (skipped 10 tensors: 9 smaller than "
                                              "k=30, 1 1-D (norms, biases))",
                                              "Hint: --verbose lists each with its reason"]
    assert main(["spectrum", ckpts["base"], ckpts["rl"], "-k", "30", "-v"]) == 1
    reasons = {line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines()[:-1]}
    assert reasons - {"1-D, not a matrix"} == {"shape (24, 24): smaller side 24 < k=30",
                                               "shape (40, 24): smaller side 24 < k=30",
                                               "shape (24, 40): smaller side 24 < k=30"}
    assert main(["spectrum", ckpts["base"], ckpts["rl"], "--max-memory", "lots"]) == 2
    assert "--max-memory 'lots'" in capsys.readouterr().err
    assert main(["spectrum", ckpts["base"], ckpts["rl"], "--plot", "x.png", "--layer", "9"]) == 2
    assert f"Error: --layer 9: no selected tensor of {ckpts['base']} is in that layer (layers 0..2)" in \
        capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["spectrum", ckpts["base"], ckpts["rl"], "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("Error: --device cuda asked for, but torch sees no CUDA device")
    assert main(["spectrum", ckpts["base"], "nowhere.safetensors"]) == 1
    capsys.readouterr()
    assert main(["spectrum", ckpts["base"], ckpts["rl"], ckpts["rl"]]) == 2  # its matrices would count twice
    assert capsys.readouterr().err.splitlines() == [f"Error: {ckpts['rl']} is given twice",
                                                   "Hint: name each fine-tuned checkpoint once"]


def test_cli_help_teaches():
    res = CliRunner().invoke(app, ["spectrum", "--help"])
    assert res.exit_code == 0
    for phrase in ("principal angles", "NSS", "--bounds", "--fast", "--max-memory", "--plot"):
        assert phrase in res.stdout


def test_an_all_zero_base_matrix_has_no_metrics(tmp_path, recwarn):
    # No spectrum to shift and no subspace to turn: the metrics are missing with the reason, no warning is
    # printed, and the matrix stays out of the pooled figures; the other matrix is measured as usual.
    w0, *_ = gapped(40, 40, 4, seed=3)
    r = run(tmp_path, {Q: w0, DOWN: np.zeros((40, 40))}, [{Q: 1.5 * w0, DOWN: np.full((40, 40), 0.1)}], k=4)
    by_name = {m.name: m.comparisons[0] for m in r.matrices}
    zero, q = by_name[DOWN], by_name[Q]
    assert zero.error == "base matrix is all zeros: no spectrum or subspace to compare"
    assert zero.nss is None and zero.angles_u == () and zero.topk_energy_change is None
    assert q.error is None and q.nss == pytest.approx(0.5, rel=1e-5)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    row = next(x for x in r.to_dict()["matrices"] if x["name"] == DOWN)
    assert row["nss"] is None and row["error"] == zero.error
