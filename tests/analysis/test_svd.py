"""The batched SVD engine against numpy/scipy references and known answers.

Tolerances: singular values agree with float64 numpy to 1e-5 * sigma_max (what an fp32
SVD achieves: fp32's unit roundoff is 6e-8, LAPACK's backward error a small multiple of it
times ||W||_2); the CPU route, from float64 Gram matrices, is held to 1e-7 * sigma_max, the
rounding of its fp32 output. Subspace angles of exact top-k vs float64 are below 0.01 degrees
where the spectrum has a gap at k. Randomized top-k is checked against exact on decaying spectra.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from ckptprobe import examples
from ckptprobe.analysis import svd
from ckptprobe.analysis.bf16 import to_float32
from ckptprobe.analysis.spectrum import default_k
from ckptprobe.analysis.svd import (RANDOMIZED_MIN_SIDE, SVDRequest, TopkMethod, check_k, decompose,
                                    rank_k, resolve_device, shape_batches, svd_bytes, svdvals, topk,
                                    use_randomized)
from ckptprobe.errors import DeviceError, UsageError
from ckptprobe.io.sources import open_source


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch and BLAS thread: on a busy machine a second thread makes LAPACK's many small
    synchronisations 10x slower (QR of 8192x32: 1.4 ms vs 110 ms), numpy's references included."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1, user_api="blas"):
        yield
    torch.set_num_threads(before)


@pytest.fixture(params=["gram", "torch"])
def route(request, monkeypatch):
    """Both CPU routes: float64 Gram matrices in numpy (the CPU default), and the torch routes CUDA takes."""
    monkeypatch.setattr(svd, "CPU_GRAM", request.param == "gram")
    return request.param


def randn(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def with_spectrum(m: int, n: int, s: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (m, n) matrix U diag(s) V^T with random orthonormal U, V; returns (W, U, V)."""
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    # torch's QR in float64 (one thread, see above): numpy's multithreaded one is slow on this machine
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q.numpy()
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q.numpy()
    return (u * s) @ v.T, u, v


def max_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle (degrees) between the column spans of a and b, by scipy."""
    return float(np.degrees(scipy.linalg.subspace_angles(np.asarray(a, np.float64), np.asarray(b, np.float64)).max()))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_svdvals_matches_numpy(shape, dtype, route):
    w = randn(3, *shape, seed=1).astype(dtype)
    got = svdvals(w)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (3, min(shape))
    # reference: float64 SVD of the very values stored in `dtype` (the engine upcasts exactly)
    ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * ref.max())
    assert (got[:, :-1] >= got[:, 1:]).all()


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_exact_topk_against_numpy(shape, route):
    m, n = shape
    s = np.linspace(10, 1, min(shape))
    w, u, v = with_spectrum(m, n, s, seed=2)
    k = 6
    U, S, V = topk(w.astype(np.float32)[None], k)
    assert U.shape == (1, m, k) and S.shape == (1, k) and V.shape == (1, n, k)
    assert U.dtype == S.dtype == V.dtype == np.float32
    np.testing.assert_allclose(S[0], s[:k], rtol=1e-5)
    assert max_angle(U[0], u[:, :k]) < 0.01
    assert max_angle(V[0], v[:, :k]) < 0.01
    # orthonormal columns, and W V = U S
    np.testing.assert_allclose(U[0].T @ U[0], np.eye(k), atol=1e-5)
    np.testing.assert_allclose(w.astype(np.float32) @ V[0], U[0] * S[0], atol=1e-4)


@pytest.mark.parametrize("shape", [(30, 18), (18, 30)])
def test_rank_k_is_eckart_young(shape, route):
    w = np.random.default_rng(3).standard_normal(shape)
    k = 5
    got = rank_k(w.astype(np.float32)[None], k)[0].astype(np.float64)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    ref = (u[:, :k] * s[:k]) @ vh[:k]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # the error is the tail of the spectrum, in Frobenius norm
    assert abs(np.linalg.norm(w - got) - np.sqrt((s[k:] ** 2).sum())) < 1e-4


def test_rank_k_recovers_a_rank_k_matrix_exactly_and_accepts_2d():
    w, _, _ = with_spectrum(25, 40, np.array([3.0, 2.0, 0.5]), seed=4)
    got = rank_k(w.astype(np.float32), 3)  # one matrix, no batch axis: B=1
    assert got.shape == (1, 25, 40)
    np.testing.assert_allclose(got[0], w, atol=1e-6)
    np.testing.assert_allclose(svdvals(w)[0, 3:], 0, atol=1e-5)


def test_batch_equals_one_at_a_time(route):
    w = randn(4, 30, 20, seed=5)
    out = decompose(w, SVDRequest(k=3))
    for b in range(4):
        one = decompose(w[b], SVDRequest(k=3))
        np.testing.assert_allclose(out.values[b], one.values[0], rtol=1e-6)
        np.testing.assert_allclose((out.U[b] * out.S[b]) @ out.V[b].T, (one.U[0] * one.S[0]) @ one.V[0].T, atol=1e-6)


@pytest.mark.parametrize("shape", [(RANDOMIZED_MIN_SIDE, 96), (96, RANDOMIZED_MIN_SIDE)])
def test_randomized_topk_vs_exact_on_decaying_spectrum(shape, route):
    """Large side -> randomized; on a spectrum decaying like trained weights' it matches exact SVD."""
    k = 16
    s = 0.85 ** np.arange(96) + 1e-3  # geometric decay with a floor
    w, u, v = with_spectrum(*shape, s, seed=6)
    wt = w.astype(np.float32)[None]
    assert use_randomized(shape, k)
    out = decompose(wt, SVDRequest(k=k, method=TopkMethod.randomized))  # all values: svdvals + randomized
    exact = decompose(wt, SVDRequest(k=k, method=TopkMethod.exact))
    assert out.randomized and not exact.randomized
    np.testing.assert_allclose(out.values[0], s, rtol=0, atol=1e-5)  # full values stay exact
    np.testing.assert_allclose(out.S[0], exact.S[0], rtol=1e-5)
    # fp32 top-k subspaces move by ~eps * s_1 / (s_k - s_k+1) ~ 1e-5 rad: both within 0.01 deg of the truth
    for mine, ref, truth in ((out.U, exact.U, u), (out.V, exact.V, v)):
        assert max_angle(mine[0], truth[:, :k]) < 0.01
        assert max_angle(mine[0], ref[0]) < 0.01
    rec = decompose(wt, SVDRequest(values=False, k=k, reconstruct=True)).reconstruction[0].astype(np.float64)
    tail = np.sqrt((s[k:] ** 2).sum())
    assert np.linalg.norm(w - rec) < tail * (1 + 1e-3)


def test_randomized_on_a_flat_spectrum_is_worse_and_that_is_why_auto_keeps_exact_for_moderate():
    """No gap, no convergence: a documented limit of randomized top-k (and of top-k itself)."""
    w = randn(1, 600, 200, seed=7)
    r = decompose(w, SVDRequest(k=8, method=TopkMethod.randomized, niter=0))
    e = decompose(w, SVDRequest(k=8, method=TopkMethod.exact))
    assert max_angle(r.U[0], e.U[0]) > 1.0
    assert not use_randomized((600, 200), 8)


def test_nonfinite_matrix_gets_nan_and_the_others_are_computed(route):
    w = randn(3, 12, 9, seed=8)
    w[1, 2, 3] = np.nan
    w[2, 0, :2] = np.inf, 0  # inf * 0 in W^T W: a NaN, and no numpy warning (the suite makes warnings errors)
    out = decompose(w, SVDRequest(k=2, reconstruct=True))
    assert out.finite.tolist() == [True, False, False]
    for x in (out.values, out.U, out.S, out.V, out.reconstruction):
        assert np.isnan(x[1:]).all()
    ref = np.linalg.svd(w[0].astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(out.values[0], ref, atol=1e-5)
    w[0, 0, 0] = np.nan
    assert np.isnan(svdvals(w)).all()


@pytest.mark.parametrize("values", [True, False])
@pytest.mark.parametrize("wide", [False, True])
def test_randomized_route_with_a_nonfinite_matrix_in_the_batch(wide, values, route):
    """The randomized route computes the finite matrices and NaN-fills the others (all of them: none
    computed), with or without all singular values (without: no Gram matrix is formed on CPU)."""
    s = 0.6 ** np.arange(24)  # a decaying spectrum: randomized top-k converges
    w = np.stack([with_spectrum(300, 24, s, seed=14)[0], randn(300, 24, seed=14)]).astype(np.float32)
    w = w.swapaxes(1, 2) if wide else w
    request = SVDRequest(values=values, k=4, method=TopkMethod.randomized, reconstruct=True)
    ok = decompose(w[:1], request)
    w[1, 0, 0] = np.nan
    out = decompose(w, request)
    assert out.randomized and out.finite.tolist() == [True, False]
    assert np.isnan(out.U[1]).all() and np.isnan(out.reconstruction[1]).all()
    np.testing.assert_allclose(out.reconstruction[0], ok.reconstruction[0], atol=1e-5)
    ref = np.linalg.svd(w[0].astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(out.S[0], ref[:4], rtol=1e-5)
    if values:
        np.testing.assert_allclose(out.values[0], ref, rtol=0, atol=1e-5 * ref[0])
        assert np.isnan(out.values[1]).all()
    else:
        assert out.values is None
    none = decompose(w[1:], request)
    assert np.isnan(none.V).all() and none.V.shape == (1, w.shape[2], 4)


def test_k_errors_name_the_matrix():
    with pytest.raises(UsageError, match=r"k=10 .*q_proj.*\(4, 8\).*between 1 and 4"):
        check_k("model.layers.0.q_proj.weight", (4, 8), 10)
    with pytest.raises(UsageError, match="between 1 and 3"):
        topk(np.zeros((1, 3, 5)), 4)
    with pytest.raises(UsageError, match="needs k >= 1"):
        decompose(np.zeros((1, 3, 5)), SVDRequest(reconstruct=True))


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="no CUDA device") as e:
        resolve_device("cuda")
    assert "\n" not in str(e.value) and "--device" in e.value.hint
    with pytest.raises(UsageError):
        resolve_device("tpu")


@pytest.mark.parametrize("version, driver, possible", [
    ("cuda: Optional[str] = None\nhip: Optional[str] = None\n", True, False),  # a CPU-only build
    ("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n", False, False),  # CUDA build, no driver
    ("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n", True, True),  # a GPU may be there: ask torch
])
def test_auto_device_decides_without_torch_where_no_gpu_can_be(tmp_path, monkeypatch, version, driver, possible):
    import ctypes
    import importlib.util
    import types

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "version.py").write_text(version)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "torch")]))
    loaded = []

    def cdll(name):  # the driver library, loaded (and not initialised) only where the build could use it
        loaded.append(name)
        if not driver:
            raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(sys, "platform", "linux")
    assert svd._gpu_possible() is possible
    assert loaded == ([] if "None\nhip" in version else ["libcuda.so.1"])


def test_results_are_fp32_numpy_on_every_route(route):
    w = randn(2, 5, 4, seed=15).astype(np.float64)
    w.setflags(write=False)  # e.g. memory-mapped checkpoint data: read, never written
    out = decompose(w, SVDRequest(k=2, reconstruct=True), device="cpu")
    for x in (out.values, out.U, out.S, out.V, out.reconstruction):
        assert isinstance(x, np.ndarray) and x.dtype == np.float32
    assert out.finite.dtype == bool


def test_shape_batches_groups_by_shape_and_respects_the_budget():
    items = [("a", (4, 8)), ("b", (8, 8)), ("c", (4, 8)), ("d", (4, 8)), ("e", (8, 8)), ("big", (100, 100))]
    cost = lambda shape: math.prod(shape)  # noqa: E731
    got = list(shape_batches(items, max_memory=70, bytes_per_matrix=cost))
    # (4, 8) costs 32: two per chunk; (8, 8) costs 64: one per chunk; (100, 100) alone though over budget
    assert got == [((4, 8), ["a", "c"]), ((4, 8), ["d"]), ((8, 8), ["b"]), ((8, 8), ["e"]), ((100, 100), ["big"])]
    assert svd_bytes((100, 50)) >= 4 * 2 * 100 * 50
    assert svd_bytes((100, 50), SVDRequest(k=10, reconstruct=True)) > svd_bytes((100, 50))


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_qr_first_route_matches_numpy(shape, route):
    """Tall (or wide) with all values + top-k: QR first, exact; no randomization even when large."""
    w = np.random.default_rng(9).standard_normal(shape)
    out = decompose(w.astype(np.float32), SVDRequest(k=7))
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(out.values[0], s, rtol=0, atol=1e-5 * s[0])
    assert max_angle(out.U[0], u[:, :7]) < 0.01 and max_angle(out.V[0], vh[:7].T) < 0.01
    np.testing.assert_allclose(out.U[0].T @ out.U[0], np.eye(7), atol=1e-5)
    assert not out.randomized
    big = (RANDOMIZED_MIN_SIDE, 512)
    assert not use_randomized(big, 64, values=True) and use_randomized(big, 64, values=False)
    assert use_randomized((RANDOMIZED_MIN_SIDE, RANDOMIZED_MIN_SIDE // 2 + 1), 64, values=True)


def test_cpu_route_on_a_wide_spectrum_beats_fp32_lapack():
    """Values from 1 down to 1e-4 and 40 exact zeros: the float64 Gram route stays within fp32's
    rounding of the largest value, where an fp32 SVD errs by ~1e-6 of it."""
    s = np.concatenate([np.logspace(0, -4, 200), np.zeros(40)])
    w, u, v = with_spectrum(1500, 240, s, seed=10)
    w32 = w.astype(np.float32)
    ref_u, ref, ref_vh = np.linalg.svd(w32.astype(np.float64), full_matrices=False)  # of the stored fp32 values
    out = decompose(w32, SVDRequest(k=16))
    np.testing.assert_allclose(out.values[0], ref, rtol=0, atol=1e-7 * ref[0])
    fp32_lapack = torch.linalg.svdvals(torch.from_numpy(w32)).numpy()  # an fp32 SVD (torch's gesdd route)
    assert np.abs(fp32_lapack - ref).max() > 10 * np.abs(out.values[0] - ref).max()
    assert max_angle(out.U[0], ref_u[:, :16]) < 1e-3 and max_angle(out.V[0], ref_vh[:16].T) < 1e-3


@pytest.mark.parametrize("shape, k", [((5, 1), 1), ((1, 5), 1), ((2, 2), 2), ((7, 3), 3), ((3, 7), 2)])
def test_tiny_shapes_and_k_equal_to_the_rank(shape, k):
    w = randn(2, *shape, seed=11)
    out = decompose(w, SVDRequest(k=k, reconstruct=True))
    ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(out.values, ref, rtol=0, atol=1e-6 * ref.max())
    if k == min(shape):
        np.testing.assert_allclose(out.reconstruction, w, atol=1e-5, rtol=0)


def test_zero_and_rank_deficient_matrices_keep_orthonormal_factors():
    """Where s_i = 0 the singular vectors are any orthonormal completion; W V = U S still holds."""
    low = randn(30, 2, seed=12) @ randn(2, 8, seed=16)
    for w in (np.zeros((9, 4), np.float32), low, low.T):
        out = decompose(w, SVDRequest(k=4, reconstruct=True))
        U, S, V = out.U[0], out.S[0], out.V[0]
        np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-6, rtol=0)
        np.testing.assert_allclose(V.T @ V, np.eye(4), atol=1e-6, rtol=0)
        np.testing.assert_allclose(w @ V, U * S, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.reconstruction[0], w, atol=1e-5, rtol=0)
        assert (out.values[0, 2:] < 1e-5).all()


@pytest.mark.parametrize("side", [40, 200])
def test_eigh_tridiagonal_blocks_and_worker_processes_agree(monkeypatch, side):
    """Small matrices: batched eigh (n <= EIGH_MAX_SIDE) or the tridiagonal route in this process;
    then everything through forked workers, in row blocks with a ragged last one. Same results
    (singular vectors up to sign: compared through W_k = U S V^T)."""
    w = randn(3, side + 30, side, seed=13)
    one = decompose(w, SVDRequest(k=5))
    monkeypatch.setattr(svd, "GRAM_BLOCK_BYTES", 8 * side * 9)  # 9 rows at a time, a ragged last block
    monkeypatch.setattr(svd, "PARALLEL_MIN_FLOPS", 0)  # every batch to forked workers ...
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # ... two of them (the thread budget)
    many = decompose(w, SVDRequest(k=5))
    np.testing.assert_allclose(many.values, one.values, atol=1e-6 * one.values.max(), rtol=0)
    np.testing.assert_allclose(many.S, one.S, rtol=1e-6)
    for out in (one, many):  # W V = U S, U orthonormal
        np.testing.assert_allclose(w @ out.V, out.U * out.S[:, None], atol=1e-4, rtol=0)
        np.testing.assert_allclose(out.U.swapaxes(1, 2) @ out.U, np.broadcast_to(np.eye(5), (3, 5, 5)), atol=1e-6)
    np.testing.assert_allclose((many.U * many.S[:, None]) @ many.V.swapaxes(1, 2),
                               (one.U * one.S[:, None]) @ one.V.swapaxes(1, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["base", "sft", "rl-1"])
def test_trained_weights_of_the_example_family_match_float64_numpy(name):
    src = open_source(str(examples.path(name)))
    for key in src.keys():
        if len(src.info(key).shape) != 2:
            continue
        w = to_float32(src.get_array(key), src.info(key).dtype)
        k = default_k(w.shape)
        u, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        out = decompose(w, SVDRequest(k=k))
        np.testing.assert_allclose(out.values[0], s, rtol=0, atol=1e-7 * s[0], err_msg=key)
        assert max_angle(out.U[0], u[:, :k]) < 1e-3, key
        assert max_angle(out.V[0], vh[:k].T) < 1e-3, key
