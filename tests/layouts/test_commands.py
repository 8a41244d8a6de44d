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


def bias_stacks(folder: Path) -> set[str]:
    """Biases of two or more dimensions (gpt-oss's `experts.gate_up_proj_bias`, (E, 2I)): vectors, not matrices."""
    return {n for n, t in weights(folder).items() if t.ndim >= 2 and (n.endswith(".bias") or n.endswith("_bias"))}


def matrices(folder: Path) -> set[tuple[str, int | None]]:
    """(name, expert) of every weight matrix: 2-D weights, and each matrix of a 3-D expert stack (biases are not)."""
    out = {(n, None) for n, t in weights(folder).items() if t.ndim == 2}
    out |= {(n, e) for n, t in weights(folder).items() if t.ndim == 3 and ".experts." in n for e in range(t.shape[0])}
    return {(n, e) for n, e in out if n not in bias_stacks(folder)}


def skipped_as_bias(data: dict, folder: Path) -> None:
    """A matrix analysis left out exactly the bias stacks, each as a bias."""
    biases = {s["name"]: s for s in data["skipped"] if s["category"] == "bias"}
    assert set(biases) == bias_stacks(folder)
    assert all("bias" in s["reason"] and "not a matrix" in s["reason"] for s in biases.values())


def values(folder: Path, name: str, expert: int | None = None) -> np.ndarray:
    """float64 values of a weight (matrix `expert` of a stack); FP8 with block scales: every
    128x128 block times its factor."""
    t = tensors(folder)[name]
    x = t.to(torch.float64).numpy()
    scale = tensors(folder).get(name + SCALE_SUFFIX)
    if scale is not None:
        s = scale.to(torch.float64).numpy()
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                x[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= s[i, j]
    return x if expert is None else x[expert]


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
    assert got and all(v for n, v in got.items() if weights(layout.base)[n].ndim >= 2)  # sft: dense


@lru_cache(maxsize=64)
def svd64(folder: Path, name: str, expert: int | None,
          k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U[:, :k], s, Vt[:k]) of a weight matrix in float64 (k None: all), through the eigendecomposition
    of its Gram matrix on the smaller side: for BERT's 30522 x 384 embedding, one matmul instead of a
    tall SVD, and the vectors of the long side only for the top k."""
    x = values(folder, name, expert)
    wide = x.shape[0] < x.shape[1]
    a = x.T if wide else x  # tall
    evals, v = np.linalg.eigh(a.T @ a)
    order = np.argsort(evals)[::-1]
    s, v = np.sqrt(np.clip(evals[order], 0, None)), v[:, order]
    v = v[:, :k]
    u = (a @ v) / np.where(s[:v.shape[1]] > 0, s[:v.shape[1]], 1)
    return (v, s, u.T) if wide else (u, s, v.T)


def conv1d(name: str) -> bool:
    """GPT-2's Conv1D weights, stored (in, out)."""
    return name.startswith("transformer.h.") and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


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
        kk = m["k"]
        u0, s0, vt0 = base_svd(layout.base, m["name"], m["expert"], kk)
        u1, s1, vt1 = svd64(ft, m["name"], m["expert"], kk)
        if conv1d(m["name"]):  # analysed as (out, in), stored (in, out): U and V swap
            (u0, vt0), (u1, vt1) = (vt0.T, u0.T), (vt1.T, u1.T)
        assert kk <= len(s0) and (k is None or kk == k)
        seen.add((m["name"], m["expert"]))
        # fp32 SVDs: singular values to ~1e-6 of the largest, so absolute tolerances relative to ||s0||
        assert m["nss"] == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(s0), rel=1e-3, abs=2e-5)
        assert m["topk_energy_change"] == pytest.approx((s1[:kk].sum() - s0[:kk].sum()) / s0[:kk].sum(),
                                                        rel=1e-3, abs=2e-5)
        # fp32 vs float64 subspaces: close where the spectrum has a gap at k (it does, at these sizes)
        np.testing.assert_allclose(m["angles_u"], angles(u0[:, :kk], u1[:, :kk]), atol=0.05)
        np.testing.assert_allclose(m["angles_v"], angles(vt0[:kk].T, vt1[:kk].T), atol=0.05)
    # every matrix is either analysed or skipped with a reason
    skipped = {s["name"] for s in data["skipped"]}
    assert {n for n, _ in matrices(layout.base) - seen} <= skipped
    assert seen and seen <= matrices(layout.base)
    skipped_as_bias(data, layout.base)
    assert bool(bias_stacks(layout.base)) == (name == "gpt_oss")
    base_svd.cache_clear()


base_svd = lru_cache(maxsize=None)(svd64)  # the base's, once for every fine-tune


def top_count(x: np.ndarray, count: int, largest: bool) -> np.ndarray:
    """Bool mask of the `count` largest (smallest) entries, ties to the lowest row-major index: every
    entry beyond the count-th value, then the first of those equal to it (a stable full sort of
    BERT's 11.7M-entry embedding took seconds)."""
    key = -x.ravel() if largest else x.ravel()  # select the `count` smallest keys
    out = np.zeros(key.size, bool)
    if count:
        kth = np.partition(key, count - 1)[count - 1]
        out[key < kth] = True
        out[np.flatnonzero(key == kth)[:count - np.count_nonzero(out)]] = True
    return out.reshape(x.shape)


@pytest.mark.parametrize("name", LAYOUTS)
def test_principal(corpus, capsys, name):
    layout = corpus[name]
    data = run_json(capsys, "principal", layout.base, layout.rl, layout.sft)
    assert data["matrices"]
    for m in data["matrices"]:
        e = m["expert"]
        n = values(layout.base, m["name"], e).size
        count = int(np.floor(m["alpha"] * n + 0.5))
        updated = changed(layout.base, Path(m["finetuned"]), m["name"])
        updated = updated if e is None else updated[e]
        principal, low = reference_masks(layout.base, m["name"], e, m["rank"], count)
        assert (m["numel"], m["principal"], m["low"]) == (n, count, count)
        assert (m["updated"], m["updated_low"]) == (updated.sum(), (updated & low).sum()), m["name"]
        # entries at the threshold of |W0^(k)| may order differently in fp32 than in float64
        assert abs(m["updated_principal"] - (updated & principal).sum()) <= max(2, 0.02 * count), m["name"]
    assert {(m["name"], m["expert"]) for m in data["matrices"]} <= matrices(layout.base)
    skipped_as_bias(data, layout.base)
    reference_masks.cache_clear()


@lru_cache(maxsize=None)
def reference_masks(base: Path, name: str, expert: int | None, rank: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(principal, low) of one base matrix from float64 references, once for every fine-tune."""
    w0 = values(base, name, expert)
    u, s, vt = svd64(base, name, expert)
    principal = top_count(np.abs((u[:, :rank] * s[:rank]) @ vt[:rank]), count, largest=True)
    return principal, top_count(np.abs(w0.astype(np.float32)), count, largest=False)


@pytest.mark.parametrize("name", LAYOUTS)
def test_consensus(corpus, capsys, name):
    layout = corpus[name]
    data = run_json(capsys, "consensus", layout.base, layout.rl, layout.sft)
    assert data["tensors"]
    for t in data["tensors"]:
        a, b = changed(layout.base, layout.rl, t["name"]), changed(layout.base, layout.sft, t["name"])
        assert t["changed"] == [a.sum(), b.sum()], t["name"]
        union = (a | b).sum()
        assert t["jaccard"][0][1] == (pytest.approx((a & b).sum() / union) if union else None), t["name"]
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
        if norm0 == 0:  # gpt-oss's zero-initialised expert biases: no relative change
            assert t["rel_to_base"] == [None, None]
            continue
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
        matrix = any(m == n for m, _ in matrices(layout.base))
        expect = changed(layout.base, layout.rl, n) if matrix else np.zeros(tuple(t.shape), bool)
        np.testing.assert_array_equal(mf.mask(n), expect, err_msg=n)
    info = run_json(capsys, "masks", "info", safe)
    mf = read_masks(safe)
    for t in info["tensors"]:
        assert t["trainable"] == int(mf.mask(t["name"]).sum())
        if t["computed"]:  # low | ~principal keeps all but about alpha of the entries
            assert 1 - 2 * 0.05 <= t["density"] <= 1
