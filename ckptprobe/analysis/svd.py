"""The batched SVD engine: singular values, top-k singular triplets and rank-k reconstructions
of stacks of same-shape matrices, on CPU or CUDA; results in fp32.

Callers hand it (B, m, n) numpy stacks (B=1 is fine) and say what they need (`SVDRequest`); it
does the least work that gives that and returns numpy arrays. Every matrix is taken in its tall
orientation (m >= n, results transposed back). On CPU it is numpy and scipy's LAPACK, no torch
(importing torch costs ~2 s, more than the analyses of a small model):

- exact values and top-k vectors come from the float64 Gram matrix G = W^T W (n x n, n the
  smaller side): one tridiagonal reduction of G (LAPACK dsytrd) gives every eigenvalue
  (dsterf) and the top-k eigenvectors (dstemr, then the reduction's reflectors), so
  s_i = sqrt(lambda_i) and V_k; U_k is the orthonormal factor of W V_k (W V_k = U_k diag(S_k)).
  Small matrices with n <= EIGH_MAX_SIDE take numpy's batched eigh of their G instead (same
  accuracy; see `_gram_batch`). Cost: m n^2 flops for G (BLAS-3, in row blocks) plus 4/3 n^3 for the reduction, against
  ~4 m n^2 + 8/3 n^3 for an SVD, which also forms vectors it never uses. Accuracy: G is formed
  and reduced in float64, so lambda_i carries an absolute error of ~c eps64 s_1^2 (c a modest
  function of m and n) and s_i a relative one of ~c eps64 (s_1 / s_i)^2 / 2: below fp32's own
  resolution (eps32 s_1 / s_i) for every s_i > ~2e-9 s_1, which is why squaring the condition
  number costs nothing here. Measured on a 20000 x 1536 rank-1400 fp32 matrix with values from
  1 down to 1e-3 against float64 numpy: largest error 6e-9 s_1 (fp32 LAPACK `svdvals`: 4e-6 s_1).
  Subspaces: V_k's angle error is ~eps64 s_1^2 / (s_k^2 - s_{k+1}^2) radians.
- top-k vectors of a large matrix (>= `RANDOMIZED_MIN_SIDE` on a side) with `method=randomized`,
  or under `auto` when the values are not wanted (`spectrum --fast`, principal masks of
  embeddings): a randomized range finder with oversampling and power iterations (Halko,
  Martinsson & Tropp 2011, Alg. 4.4), in fp32 numpy; see `_randomized_topk` for its error.

On CUDA (not measured here: no GPU was available) the stack is copied to the device and torch's
cuSOLVER routes are used as they are, the (small) results copied back:
`svdvals` for values only, one thin SVD for moderate matrices, QR first for tall ones with
values + top-k (W = Q R, SVD of the small R, U_k = Q U_R[:, :k] applied with ormqr), and the
randomized range finder for large ones.

Matrices holding NaN/inf get NaN results instead of stopping the batch (LAPACK refuses them).
`shape_batches` groups named matrices by shape and chunks each group to a memory budget, so a
model is never held whole. torch (CUDA only), numpy and scipy are imported inside the functions,
so that the CLI can use `TopkMethod` as an option type without `ckptprobe --help` paying for them.
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ckptprobe.analysis.choices import TopkMethod
from ckptprobe.errors import DeviceError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

RANDOMIZED_MIN_SIDE = 8192  # `auto` uses randomized top-k when the longer side reaches this
QR_FIRST_RATIO = 2  # CUDA: exact values + top-k of matrices at least this tall go through QR first
GRAM_BLOCK_BYTES = 64 << 20  # CPU: rows of W are converted to float64 this many bytes at a time
CPU_GRAM = True  # False: CPU runs the torch routes CUDA runs (the tests check those this way)
PARALLEL_MIN_FLOPS = 1 << 30  # CPU: matrices costing this much (m n^2 + n^3) go to worker processes
EIGH_MAX_SIDE = 128  # CPU: smaller matrices with n up to this are decomposed by numpy's batched eigh
DEFAULT_NITER = 4  # power iterations: each multiplies the gap ratio sigma_{l+1}/sigma_k by itself twice more


@dataclass(frozen=True)
class SVDRequest:
    """What to compute for each matrix of a (B, m, n) stack.

    values: all min(m, n) singular values. k: top-k singular triplets (0: none).
    reconstruct: also the rank-k reconstruction W^(k) = U_k diag(S_k) V_k^T (needs k >= 1).
    """

    values: bool = True
    k: int = 0
    reconstruct: bool = False
    method: TopkMethod = TopkMethod.auto
    oversample: int | None = None  # randomized: extra columns of the sketch; None -> max(k, 10)
    niter: int = DEFAULT_NITER  # randomized: power iterations
    seed: int = 0  # randomized: the Gaussian test matrix, so results are reproducible


@dataclass(frozen=True)
class SVDOutput:
    """Results for a (B, m, n) stack: fp32 numpy arrays whatever the device; rows of non-finite
    matrices (`finite[b]` False, a bool (B,) array) are NaN.

    values (B, min(m, n)) descending | None; U (B, m, k), S (B, k), V (B, n, k) | None;
    reconstruction (B, m, n) | None; randomized: whether top-k came from the randomized method.
    """

    values: np.ndarray | None
    U: np.ndarray | None
    S: np.ndarray | None
    V: np.ndarray | None
    reconstruction: np.ndarray | None
    finite: np.ndarray
    randomized: bool


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when torch sees a CUDA device, else "cpu"; "cuda" without CUDA -> DeviceError.

    Returns the device's name. "cpu", and "auto" where no CUDA device can be present (torch built
    without CUDA or ROCm, or no GPU driver to load), are settled without importing torch.
    """
    name = str(device)
    if name == "cpu" or (name == "auto" and "torch" not in sys.modules and not _gpu_possible()):
        return "cpu"
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} asked for, but torch sees no CUDA device "
                          f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)",
                          hint="use --device auto or --device cpu")
    try:
        return str(torch.device(name))
    except RuntimeError as e:
        raise UsageError(f"unknown device {name!r}: {e}", hint="use auto, cpu, cuda or cuda:N") from None


def _gpu_possible() -> bool:
    """False when torch cannot see a GPU here, decided without importing it (~2 s): torch is
    built for CPU only (its `version.py` says cuda = hip = None), or, on Linux, the GPU driver
    library it would load is absent. True when a GPU may be there: then torch is asked."""
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    except OSError:
        return True
    builds = re.findall(r"^(cuda|hip)\s*(?::[^=\n]*)?=\s*(.+)$", text, re.M)
    built = [lib for lib, value in builds if value.strip() != "None"]
    if not built:
        return False
    if not sys.platform.startswith("linux"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1" if "cuda" in built else "libamdhip64.so")  # the driver's library only: no device
    except OSError:
        return False
    return True


def use_randomized(shape: tuple[int, int], k: int, method: TopkMethod = TopkMethod.auto,
                   oversample: int | None = None, values: bool = False) -> bool:
    """Whether `decompose` takes the randomized route for top-k of an (m, n) matrix (`values`: all
    singular values are wanted too)."""
    sketch = k + (max(k, 10) if oversample is None else oversample)
    if method == TopkMethod.exact or k == 0 or sketch >= min(shape):
        return False  # a sketch as wide as the matrix saves nothing
    if method == TopkMethod.randomized:
        return True
    return max(shape) >= RANDOMIZED_MIN_SIDE and not (values and _qr_first(shape))


def _qr_first(shape: tuple[int, int]) -> bool:
    return max(shape) >= QR_FIRST_RATIO * min(shape)


def check_k(name: str, shape: tuple[int, ...], k: int) -> None:
    """UsageError naming the matrix when k is not in 1..min(m, n)."""
    if not 1 <= k <= min(shape):
        raise UsageError(f"k={k} is out of range for {name} of shape {tuple(shape)}: "
                         f"k must be between 1 and {min(shape)}",
                         hint=f"use k={min(shape)} or less, or exclude that matrix", param="k")


def decompose(batch: np.ndarray, request: SVDRequest = SVDRequest(), device: str | None = None) -> SVDOutput:
    """Run `request` on a (B, m, n) stack (or one (m, n) matrix, treated as B=1) of any float dtype.

    Computes on `device` ("cpu", the default, "cuda", "cuda:N": the stack is copied there and
    the results back) and returns fp32 numpy arrays.
    """
    import numpy as np

    a = np.asarray(batch)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise UsageError(f"decompose wants a (B, m, n) stack, got shape {tuple(a.shape)}")
    B, m, n = a.shape
    k = request.k
    if k:
        check_k("the matrix", (m, n), k)
    if request.reconstruct and not k:
        raise UsageError("a rank-k reconstruction needs k >= 1")
    randomized = use_randomized((m, n), k, request.method, request.oversample, request.values)
    wide = m < n
    if wide:
        a = a.swapaxes(-1, -2)  # (B, n, m): the tall orientation (LAPACK's SVDs are faster on tall matrices)
    oversample = max(k, 10) if request.oversample is None else request.oversample
    recon = None
    device = str(device or "cpu")
    if device == "cpu" and CPU_GRAM:
        if randomized and not request.values:  # no Gram matrix needed (it would cost m n^2 flops)
            finite, values, U, S, V = np.isfinite(a).all(axis=(-2, -1)), None, None, None, None
        else:  # the finite matrices' all values (if wanted) and, unless randomized, top-k from Gram matrices
            finite, values, U, S, V = _gram_batch(a, 0 if randomized else k, request.values)
        if randomized and finite.any():
            U, S, V = _randomized_topk(a[finite].astype(np.float32, copy=False), k, oversample, request.niter,
                                       request.seed)
    else:
        finite, values, U, S, V, recon = _torch_routes(a, request, randomized, oversample, device)
    if wide and U is not None:
        U, V = V, U  # A^T = U S V^T  <=>  A = V S U^T
    values = _fill(values, finite, (B, min(m, n))) if request.values else None
    if k:
        U, S, V = _fill(U, finite, (B, m, k)), _fill(S, finite, (B, k)), _fill(V, finite, (B, n, k))
    if request.reconstruct:
        recon = (U * S[:, None, :]) @ V.swapaxes(-1, -2) if recon is None else \
            _fill(recon.swapaxes(-1, -2) if wide else recon, finite, (B, m, n))  # (B, m, n)
    return SVDOutput(values, U, S, V, recon, finite, randomized)


def _fill(x: np.ndarray | None, finite: np.ndarray, shape: tuple) -> np.ndarray:
    """fp32 results of the finite matrices scattered into a NaN array of the full batch's `shape`."""
    import numpy as np

    if x is not None and x.shape[0] == shape[0]:
        return x.astype(np.float32, copy=False)
    full = np.full(shape, np.nan, np.float32)
    if x is not None:
        full[finite] = x
    return full


_BLAS = None  # (threadpoolctl controller, whether scipy's BLAS was loaded when it was made)


def _blas_threads(n: int | None):
    """A context that runs numpy's and scipy's BLAS/LAPACK on `n` threads (None: as they are)."""
    global _BLAS
    if n is None:
        return contextlib.nullcontext()
    scipy_loaded = "scipy.linalg" in sys.modules  # scipy brings its own BLAS: look again once it is there
    if _BLAS is None or _BLAS[1] != scipy_loaded:  # finding the libraries costs ~10 ms: done at most twice
        from threadpoolctl import ThreadpoolController

        _BLAS = (ThreadpoolController(), scipy_loaded)
    return _BLAS[0].limit(limits=n, user_api="blas")


def _gram_batch(a: np.ndarray, k: int, values: bool):
    """finite (B,) bool, values (B, N) if `values`, and top-k U (B, M, k), S (B, k), V (B, N, k) if k,
    of a tall (B, M, N) float stack, from float64 Gram matrices (see the module docstring); fp32,
    NaN rows for matrices holding NaN/inf.

    Small matrices (below PARALLEL_MIN_FLOPS) run in this process on one BLAS thread; those with
    n <= EIGH_MAX_SIDE are decomposed together by numpy's batched `eigh` (LAPACK dsyevd, every
    eigenvector), one call for the stack and no scipy import (~0.3 s): it forms all n vectors,
    which past n = 128 costs more than the tridiagonal route's k (one thread, values + top 8:
    n = 64 0.49 vs 0.60 ms, n = 128 2.2 vs 1.7 ms, n = 256 13 vs 7 ms per matrix). LAPACK's
    tridiagonal reduction is half matrix-vector work in many small steps, and a second thread
    costs more at each step's barrier than it saves on a busy machine: 512 x 128 took 6.9 ms on
    one thread and 68 ms on two, 2048 x 512 47 vs 397 ms (2 cores, load 3.7-4.5). Larger
    matrices spend the thread budget (`ckptprobe._threads.default()`, which `--threads` sets) on
    forked processes, one matrix each on one thread, rather than on LAPACK's threads: a busy
    machine stalls a threaded LAPACK at every barrier but not independent processes; a single
    large matrix gets the whole budget.
    """
    import numpy as np

    from ckptprobe._threads import default as thread_budget
    from ckptprobe.analysis.runner import parallel_map

    B, M, N = a.shape
    large = M * N * N + N ** 3 >= PARALLEL_MIN_FLOPS
    if not large and N <= EIGH_MAX_SIDE:
        with _blas_threads(1):
            outs = _eigh_batch(a, k, values)
    else:
        from scipy.linalg import lapack  # noqa: F401  (loaded before the thread controller looks for BLAS)

        workers = min(B, thread_budget()) if large else 1
        with _blas_threads(1 if workers > 1 or not large else None):  # forked workers inherit one thread each
            outs = list(parallel_map(lambda i: _gram(a[i], k, values), [(i,) for i in range(B)], workers,
                                     fork=True))
    finite = np.array([o is not None for o in outs], bool)
    shapes = ((N,), (M, k), (k,), (N, k))

    def stack(i: int) -> np.ndarray:
        out = np.full((B, *shapes[i]), np.nan, np.float32)
        for b, o in enumerate(outs):
            if o is not None:
                out[b] = o[i]
        return out

    return (finite, stack(0) if values else None, *((stack(1), stack(2), stack(3)) if k else (None, None, None)))


def _row_blocks(w: np.ndarray):
    """W's rows as float64 blocks of GRAM_BLOCK_BYTES: a list when W fits in four (converted once
    and reused for W V), else a generator (converted again for W V, so memory stays one block)."""
    import numpy as np

    rows = max(1, GRAM_BLOCK_BYTES // (8 * w.shape[1]))
    blocks = (w[lo:lo + rows].astype(np.float64) for lo in range(0, len(w), rows))
    return list(blocks) if len(w) <= 4 * rows else blocks


def _gram_matrix(blocks, n: int) -> np.ndarray | None:
    """G = W^T W (n, n) float64 from W's row blocks; None if W holds NaN/inf."""
    import numpy as np

    g = np.zeros((n, n))
    with np.errstate(invalid="ignore"):  # inf * 0: the NaN it makes is the answer, not a warning for the user
        for blk in blocks:  # G += B^T B (numpy calls dsyrk)
            g += blk.T @ blk
    # G_jj = sum of squares of column j: NaN/inf iff W has any
    return g if np.isfinite(np.diagonal(g)).all() else None


def _eigh_batch(a: np.ndarray, k: int, values: bool) -> list:
    """`_gram`'s result for each matrix of a tall (B, M, N) stack, through one batched `eigh`."""
    import numpy as np

    B, M, N = a.shape
    grams = [_gram_matrix(_row_blocks(w), N) for w in a]
    ok = [i for i, g in enumerate(grams) if g is not None]
    outs = [None] * B
    if not ok:
        return outs
    g = np.stack([grams[i] for i in ok])  # (b, N, N)
    lam, z = np.linalg.eigh(g) if k else (np.linalg.eigvalsh(g), None)  # ascending
    for j, i in enumerate(ok):
        outs[i] = _factors(a[i], None, lam[j], lam[j, N - k:], None if z is None else z[j, :, N - k:], k, values)
    return outs


def _gram(w, k: int, values: bool):
    """One tall (M, N) float array -> (all N singular values descending | None, U (M, k), S (k,),
    V (N, k)), float64, through the eigen-decomposition of G = W^T W; None if W holds NaN/inf."""
    import numpy as np
    from scipy.linalg import lapack

    N = w.shape[1]
    blocks = _row_blocks(w)
    g = _gram_matrix(blocks, N)
    if g is None:
        return None
    lam = lam_k = z = None
    if N == 1:  # G is its own eigenvalue (LAPACK's tridiagonal routines want N >= 2)
        lam = lam_k = g[0]
        z = np.ones((1, 1))
    else:
        lwork, _ = lapack.dsytrd_lwork(N, lower=1)
        # G = Q T Q^T, T tridiagonal (d, e); Q's reflectors below T's subdiagonal of `h`. G is symmetric,
        # so G.T is the same matrix in the column-major order LAPACK reads without a copy.
        h, d, e, tau, info = lapack.dsytrd(g.T, lower=1, lwork=int(lwork), overwrite_a=1)
        _check(info, "dsytrd")
        if values:
            lam, info = lapack.dsterf(d, e)  # every eigenvalue of T, ascending
            _check(info, "dsterf")
        if k:  # eigenvectors of T for its k largest eigenvalues (1-based indices N-k+1..N, ascending)
            _, lam_k, z, info = lapack.dstemr(d, np.append(e, 0.0), 2, 0.0, 0.0, N - k + 1, N)
            _check(info, "dstemr")
            # V = Q z. Q = diag(1, Q'), Q' stored like a QR factorization's reflectors in h[1:, :-1]
            z = z[:, :k]
            z[1:], _, info = lapack.dormqr("L", "N", h[1:, :-1], tau, z[1:], lwork=max(1, 64 * k))
            _check(info, "dormqr")
            lam_k = lam_k[:k]
    return _factors(w, blocks if isinstance(blocks, list) else None, lam, lam_k, z, k, values)


def _factors(w: np.ndarray, blocks: list | None, lam, lam_k, z, k: int, values: bool):
    """(values descending | None, U (M, k), S (k,), V (N, k)) float64 of a tall W from G's eigenvalues
    `lam` (all, ascending), `lam_k` (the top k, ascending) and their eigenvectors z (N, k);
    `blocks`: W's float64 row blocks if at hand."""
    import numpy as np

    # rounding can leave eigenvalues of a (semi-)definite G slightly negative
    vals = np.sqrt(np.maximum(lam[::-1], 0)) if values else None
    if not k:
        return vals, None, None, None
    v = z[:, ::-1]  # descending
    s = np.sqrt(np.maximum(lam_k[::-1], 0))
    y = np.concatenate([blk @ v for blk in (blocks if blocks is not None else _row_blocks(w))])  # W V = U S, (M, k)
    # Orthonormalizing W V (rather than dividing by S) keeps U orthonormal where s_i is 0 or tiny;
    # R's diagonal is +-S, and flipping by its sign keeps W v_i = s_i u_i.
    u, r = np.linalg.qr(y)
    u *= np.where(np.diagonal(r) < 0, -1.0, 1.0)
    return vals, u, s, v


def _check(info: int, routine: str) -> None:
    import numpy as np

    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed (info={info})")


def _torch_routes(a: np.ndarray, request: SVDRequest, randomized: bool, oversample: int, device: str):
    """finite (B,) bool, and values, U, S, V, reconstruction (each None unless asked) of the finite
    matrices of a tall (B, M, N) stack, by torch on `device` (CUDA, or CPU with CPU_GRAM off); numpy
    arrays, fp32. The stack is copied to the device whole and checked for NaN/inf there."""
    import numpy as np
    import torch

    k = request.k
    a = np.ascontiguousarray(a)
    t = torch.from_numpy(a if a.flags.writeable else a.copy()).to(device)  # torch wants writable memory
    finite = torch.isfinite(t).all(dim=(-2, -1))  # (B,): LAPACK refuses NaN/inf, so those are NaN-filled
    if not bool(finite.all()):
        t = t[finite]
    finite = finite.cpu().numpy()
    if t.shape[0] == 0:
        return finite, None, None, None, None, None
    # fp32: cuSOLVER has no half-precision SVD, and bf16's 8-bit mantissa (relative spacing 2^-8) would
    # swamp the small singular values and the degree-level principal angles we measure (Sec. 4.1 of
    # "The Path Not Taken"). The upcast is exact.
    t = t.float()
    values = U = S = V = None
    if k and not randomized and request.values and _qr_first(t.shape[-2:]):
        values, U, V = _qr_svd(t, k)
        S = values[..., :k]
    elif k and not randomized:
        U, values, Vh = torch.linalg.svd(t, full_matrices=False)  # (b, M, r), (b, r), (b, r, N)
        U, S, V = U[..., :k], values[..., :k], Vh[..., :k, :].mT
    else:
        if request.values:
            values = torch.linalg.svdvals(t)
        if k:
            U, S, V = _randomized_topk(t, k, oversample, request.niter, request.seed)
    recon = (U * S[:, None, :]) @ V.mT if request.reconstruct else None  # (b, M, N), on the device

    def host(x):
        return None if x is None else x.cpu().numpy()

    return finite, host(values if request.values else None), host(U), host(S), host(V), host(recon)


def _qr_svd(a: torch.Tensor, k: int):
    """All singular values and exact top-k vectors of a tall (B, M, N) fp32 stack, QR first.

    Returns values (B, N), U (B, M, k), V (B, N, k).
    """
    import torch

    B, M, N = a.shape
    h, tau = torch.geqrf(a)  # R in the upper triangle of h, Householder reflectors below it
    ur, values, vh = torch.linalg.svd(h[..., :N, :].triu())  # R = ur diag(values) vh, (B, N, N)
    c = torch.zeros(B, M, k, dtype=a.dtype, device=a.device)
    c[:, :N] = ur[..., :k]
    return values, torch.ormqr(h, tau, c), vh[..., :k, :].mT  # U_k = Q [ur_k; 0]


def _gaussian(shape: tuple[int, ...], seed: int, like):
    """A seeded standard Gaussian array of `shape`, fp32, of the kind of `like` (numpy, or torch on its device)."""
    import numpy as np

    if isinstance(like, np.ndarray):
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    import torch

    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)


def _randomized_topk(a, k: int, oversample: int, niter: int, seed: int):
    """Top-k triplets of a tall (B, M, N) fp32 stack of finite matrices (a numpy array on CPU, a torch
    tensor on CUDA) by a randomized range finder.

    Sketch width l = k + oversample. Each power iteration re-orthonormalizes (QR) so small
    singular directions are not lost to rounding; the error of the i-th value decays like
    (sigma_{l+1}/sigma_i)^(2*niter+1). Returns U (B, M, k), S (B, k), V (B, N, k) of `a`'s kind.
    """
    import numpy as np

    if isinstance(a, np.ndarray):
        from scipy.linalg import qr

        # scipy's QR (sgeqrf + sorgqr) of 8960 x 128 fp32: 52 ms, numpy's 169 ms (torch's: 39 ms)
        def orth(x):
            return np.stack([qr(m, mode="economic", overwrite_a=True, check_finite=False)[0] for m in x])

        svd = np.linalg.svd
    else:
        torch = sys.modules["torch"]
        orth, svd = (lambda x: torch.linalg.qr(x).Q), torch.linalg.svd
    B, M, N = a.shape
    at = a.swapaxes(-1, -2)  # (B, N, M)
    omega = _gaussian((B, N, min(k + oversample, N)), seed, a)  # (B, N, l)
    q = orth(a @ omega)  # (B, M, l): orthonormal basis of the sketched range
    for _ in range(niter):
        z = orth(at @ q)  # (B, N, l)
        q = orth(a @ z)  # (B, M, l)
    # small = Q^T A (B, l, N) is wide: decompose its transpose A^T Q (N, l), formed directly
    ub, s, vh = svd(at @ q, full_matrices=False)  # small^T = ub s vh
    # small = vh^T s ub^T: left vectors of `small` are vh^T, right ones ub
    return q @ vh.swapaxes(-1, -2)[..., :k], s[..., :k], ub[..., :k]


def svdvals(batch: np.ndarray, device: str | None = None) -> np.ndarray:
    """(B, m, n) any float dtype -> (B, min(m, n)) fp32 singular values, descending."""
    return decompose(batch, SVDRequest(values=True), device).values


def topk(batch: np.ndarray, k: int, method: TopkMethod = TopkMethod.auto,
         device: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, m, n) -> U (B, m, k), S (B, k), V (B, n, k), fp32, with W ~ U diag(S) V^T.

    Exact for moderate matrices, randomized for those with a side >= RANDOMIZED_MIN_SIDE
    (`method` overrides). Each singular vector's sign is arbitrary, as in any SVD.
    """
    out = decompose(batch, SVDRequest(values=False, k=k, method=method), device)
    return out.U, out.S, out.V


def rank_k(batch: np.ndarray, k: int, method: TopkMethod = TopkMethod.auto,
           device: str | None = None) -> np.ndarray:
    """(B, m, n) -> (B, m, n) fp32 rank-k reconstruction W^(k) = U_k diag(S_k) V_k^T (Eckart-Young best)."""
    return decompose(batch, SVDRequest(values=False, k=k, reconstruct=True, method=method), device).reconstruction


def svd_bytes(shape: tuple[int, int], request: SVDRequest = SVDRequest()) -> int:
    """A generous estimate of the working memory (bytes) one (m, n) matrix needs in `decompose`.

    The fp32 copy, LAPACK's own copy and workspace (~ a few r x r blocks for gesdd), the thin
    factors when vectors are formed, and the reconstruction.
    """
    m, n = shape
    r = min(m, n)
    total = 2 * m * n + 4 * r * r + r
    if request.k and not use_randomized(shape, request.k, request.method, request.oversample, request.values):
        total += (m + n) * r  # thin U and V^T of the exact route (or QR's reflectors and R)
    elif request.k:
        total += 3 * (m + n) * (request.k + (request.oversample or max(request.k, 10)))
    if request.reconstruct:
        total += m * n
    return 4 * total


def shape_batches(shapes: Iterable[tuple[str, tuple[int, ...]]], max_memory: int,
                  bytes_per_matrix: Callable[[tuple[int, ...]], int]) -> Iterator[tuple[tuple[int, ...], list[str]]]:
    """Group (name, shape) pairs by shape (groups in order of first appearance, names in input
    order) and yield (shape, names) chunks whose `bytes_per_matrix` total fits `max_memory`.

    A matrix larger than the budget on its own still gets a chunk of one: the budget bounds
    batching, it cannot make one SVD smaller.
    """
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, shape in shapes:
        groups.setdefault(tuple(shape), []).append(name)
    for shape, names in groups.items():
        per_chunk = max(1, max_memory // max(1, bytes_per_matrix(shape)))
        for i in range(0, len(names), per_chunk):
            yield shape, names[i:i + per_chunk]
