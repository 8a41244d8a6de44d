"""Every command on every corpus layout, with ordinary options, checked against independent
references: the files are read with safetensors/torch (not ckptprobe's reader), FP8 weights
are decoded by torch and scaled block by block in float64, update masks are brute-force
comparisons of the raw bits, and spectra come from numpy's float64 SVD."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import LAYOUTS, SCALE_SUFFIX
from safetensors import safe_open

from ckptprobe.cli import main
from ckptprobe.io.maskfile import read_masks


@lru_cache(maxsize=4)
def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out |= {n: f.get_tensor(n) for n in f.keys()}
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors that are weights: floating point, not quantization scales."""
    return {n: t for n, t in tensors(folder).items() if t.is_floating_point() and not n.endswith(SCALE_SUFFIX)}


def matrices(folder: Path) -> dict[str, torch.Tensor]:
    return {n: t for n, t in weights(folder).items() if t.ndim == 2}


def values(folder: Path, name: str) -> np.ndarray:
    """float64 values of a weight; FP8 with block scales: every 128x128 block times its factor."""
    t = tensors(folder)[name]
    x = t.to(torch.float64).numpy()
    scale = tensors(folder).get(name + SCALE_SUFFIX)
    if scale is not None:
        s = scale.to(torch.float64).numpy()
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                x[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= s[i, j]
    return x


def changed(base: Path, ft: Path, name: str) -> np.ndarray:
    """Bool mask of entries whose stored bits differ, +0 and -0 being one value (no NaN in the corpus)."""
    a, b = tensors(base)[name], tensors(ft)[name]
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    differ = (a.view(ints) != b.view(ints)).numpy()
    both_zero = ((a.to(torch.float32) == 0) & (b.to(torch.float32) == 0)).numpy()
    return differ & ~both_zero


def run_json(capsys, *args) -> dict:
    code = main([*map(str, args), "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    return json.loads(out)


@pytest.mark.parametrize("name", LAYOUTS)
def test_sparsity(corpus, capsys, name):
    layout = corpus[name]
    for ft in (layout.rl, layout.sft):
        data = run_json(capsys, "sparsity", layout.base, ft)
        got = {t["name"]: t["changed"] for t in data["tensors"]}
        # every weight is counted, on its stored bits; scales and integer buffers are not weights
        assert got == {n: int(changed(layout.base, ft, n).sum()) for n in weights(layout.base)}
        assert data["total"]["changed"] == sum(got.values())
        assert data["total"]["numel"] == sum(t.numel() for t in weights(layout.base).values())
    assert got and all(v for n, v in got.items() if weights(layout.base)[n].numel() > 64)  # sft: dense


def svd64(x: np.ndarray):
    return np.linalg.svd(x, full_matrices=False)


def angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, ascending) between the column spans of orthonormal a and b."""
    cos = np.clip(np.linalg.svd(a.T @ b, compute_uv=False), -1, 1)
    return np.sort(np.degrees(np.arccos(cos)))


@pytest.mark.parametrize("name", LAYOUTS)
def test_spectrum(corpus, capsys, name):
    layout = corpus[name]
    data = run_json(capsys, "spectrum", layout.base, layout.rl, layout.sft)
    k = data["k"] if isinstance(data["k"], int) else None
    seen = set()
    for m in data["matrices"]:
        assert m["error"] is None, m
        ft = Path(m["finetuned"])
        w0, w1 = values(layout.base, m["name"]), values(ft, m["name"])
        u0, s0, vt0 = svd64(w0)
        u1, s1, vt1 = svd64(w1)
        kk = m["k"]
        assert kk <= min(w0.shape) and (k is None or kk == k)
        assert m["nss"] == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(s0), rel=1e-3, abs=1e-6)
        assert m["topk_energy_change"] == pytest.approx((s1[:kk].sum() - s0[:kk].sum()) / s0[:kk].sum(),
                                                        rel=1e-3, abs=1e-6)
        # fp32 vs float64 subspaces: close where the spectrum has a gap at k (it does, at these sizes)
        np.testing.assert_allclose(m["angles_u"], angles(u0[:, :kk], u1[:, :kk]), atol=0.05)
        np.testing.assert_allclose(m["angles_v"], angles(vt0[:kk].T, vt1[:kk].T), atol=0.05)
        seen.add(m["name"])
    # every matrix is either analysed or skipped with a reason
    skipped = {s["name"] for s in data["skipped"]}
    assert set(matrices(layout.base)) <= seen | skipped
    assert seen and seen <= set(matrices(layout.base))


def top_count(x: np.ndarray, count: int, largest: bool) -> np.ndarray:
    """Bool mask of the `count` largest (smallest) entries, ties to the lowest row-major index."""
    flat = x.ravel()
    order = np.argsort(-flat if largest else flat, kind="stable")
    out = np.zeros(flat.size, bool)
    out[order[:count]] = True
    return out.reshape(x.shape)


@pytest.mark.parametrize("name", LAYOUTS)
def test_principal(corpus, capsys, name):
    layout = corpus[name]
    data = run_json(capsys, "principal", layout.base, layout.rl, layout.sft)
    assert data["matrices"]
    for m in data["matrices"]:
        w0 = values(layout.base, m["name"])
        n, count = w0.size, int(np.floor(m["alpha"] * w0.size + 0.5))
        updated = changed(layout.base, Path(m["finetuned"]), m["name"])
        u, s, vt = svd64(w0)
        r = m["rank"]
        principal = top_count(np.abs((u[:, :r] * s[:r]) @ vt[:r]), count, largest=True)
        low = top_count(np.abs(w0.astype(np.float32)), count, largest=False)
        assert (m["numel"], m["principal"], m["low"]) == (n, count, count)
        assert (m["updated"], m["updated_low"]) == (updated.sum(), (updated & low).sum()), m["name"]
        # entries at the threshold of |W0^(k)| may order differently in fp32 than in float64
        assert abs(m["updated_principal"] - (updated & principal).sum()) <= max(2, 0.02 * count), m["name"]
    assert {m["name"] for m in data["matrices"]} <= set(matrices(layout.base))


@pytest.mark.parametrize("name", LAYOUTS)
def test_consensus(corpus, capsys, name):
    layout = corpus[name]
    data = run_json(capsys, "consensus", layout.base, layout.rl, layout.sft)
    assert data["tensors"]
    for t in data["tensors"]:
        a, b = changed(layout.base, layout.rl, t["name"]), changed(layout.base, layout.sft, t["name"])
        assert t["changed"] == [a.sum(), b.sum()], t["name"]
        union = (a | b).sum()
        assert t["jaccard"][0][1] == pytest.approx((a & b).sum() / union if union else 1.0), t["name"]
        assert t["all_runs"] == pytest.approx((a & b).sum() / a.size)
    assert {t["name"] for t in data["tensors"]} == set(weights(layout.base))


@pytest.mark.parametrize("name", LAYOUTS)
def test_profile(corpus, capsys, name):
    layout = corpus[name]
    data = run_json(capsys, "profile", layout.base, layout.rl, layout.sft, "--smooth", "1")  # raw ratios
    names = weights(layout.base)
    for i, ft in enumerate((layout.rl, layout.sft)):
        assert data["changed"][i] == sum(int(changed(layout.base, ft, n).sum()) for n in names)
        assert data["numel"][i] == sum(t.numel() for t in names.values())
    assert data["tensors"]
    for t in data["tensors"]:
        for i, ft in enumerate((layout.rl, layout.sft)):
            mask = changed(layout.base, ft, t["name"])
            np.testing.assert_allclose(t["row_ratio"][i], mask.mean(axis=1))
            np.testing.assert_allclose(t["col_ratio"][i], mask.mean(axis=0))


@pytest.mark.parametrize("name", LAYOUTS)
def test_drift(corpus, capsys, name):
    layout = corpus[name]
    data = run_json(capsys, "drift", layout.base, layout.rl, layout.sft)
    assert data["tensors"]
    for t in data["tensors"]:
        w0, w1, w2 = (values(f, t["name"]) for f in (layout.base, layout.rl, layout.sft))
        norm0 = np.linalg.norm(w0)
        assert t["base_norm"] == pytest.approx(norm0, rel=1e-5)
        assert t["rel_to_base"] == pytest.approx([np.linalg.norm(w1 - w0) / norm0, np.linalg.norm(w2 - w0) / norm0],
                                                 rel=1e-4, abs=1e-9)
    assert {t["name"] for t in data["tensors"]} <= set(weights(layout.base))


@pytest.mark.parametrize("name", LAYOUTS)
def test_masks(corpus, capsys, tmp_path, name):
    layout = corpus[name]
    safe, update = tmp_path / "safe.safetensors", tmp_path / "update.safetensors"
    assert main(["masks", str(layout.base), "--kind", "safe", "--vectors", "train", "-o", str(safe)]) == 0
    assert main(["masks", str(layout.base), "--kind", "update", "--from", str(layout.rl), "--vectors", "freeze",
                 "-o", str(update)]) == 0
    capsys.readouterr()
    # checkpoint coordinates: every weight, as stored, and nothing that is not a weight
    for path in (safe, update):
        mf = read_masks(path)
        assert set(mf.keys()) == set(weights(layout.base))
        assert all(mf.shape(n) == tuple(t.shape) for n, t in weights(layout.base).items())
    mf = read_masks(update)
    for n, t in weights(layout.base).items():
        expect = changed(layout.base, layout.rl, n) if t.ndim == 2 else np.zeros(tuple(t.shape), bool)
        np.testing.assert_array_equal(mf.mask(n), expect, err_msg=n)
    info = run_json(capsys, "masks", "info", safe)
    mf = read_masks(safe)
    for t in info["tensors"]:
        assert t["trainable"] == int(mf.mask(t["name"]).sum())
        if t["computed"]:  # low | ~principal keeps all but about alpha of the entries
            assert 1 - 2 * 0.05 <= t["density"] <= 1
