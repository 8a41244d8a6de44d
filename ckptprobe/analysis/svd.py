"""The batched SVD engine: singular values, top-k singular triplets and rank-k reconstructions
of stacks of same-shape matrices, in fp32, on CPU or CUDA.

Callers hand it (B, m, n) stacks (B=1 is fine) and say what they need (`SVDRequest`); it
does the least work that gives that:

- values only: `torch.linalg.svdvals` (no vectors are formed);
- top-k vectors of a moderate matrix: one exact thin SVD, sliced (its values come free);
- top-k vectors of a large matrix (>= `RANDOMIZED_MIN_SIDE` on a side: embeddings, lm_head,
  MLP projections of 7B-class models): randomized range finder with oversampling and power
  iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4), full values then come from `svdvals`;
- except, exactly and for less, when all values *and* top-k vectors of a tall matrix (one side
  >= `QR_FIRST_RATIO` x the other) are asked for: QR first, W = Q R, then the SVD of the small
  square R gives every value and V, and U_k = Q U_R[:, :k] is applied with the Householder
  reflectors (ormqr) without forming Q. LAPACK's own thin SVD does the same but forms all of Q
  (m x n), which is what makes it 2x its `svdvals`. Measured on this machine (1 thread, loaded):
  8960x1536 5.0 s vs svdvals + randomized 6.1 s vs full SVD 8.4 s; 40000x1536 16.9 vs 21.6 vs 29.8 s.

Every matrix is handed to torch in its tall orientation (m >= n) and results are transposed
back: torch's CPU SVD is 4-7x slower on wide matrices (PERF_NOTES). Matrices holding NaN/inf
get NaN results instead of stopping the batch (LAPACK refuses them). `shape_batches` groups
named matrices by shape and chunks each group to a memory budget, so a model is never held
whole. torch is imported inside the functions, so that the CLI can use `TopkMethod` as an option
type without `ckptprobe --help` paying 1.7 s for importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ckptprobe.errors import DeviceError, UsageError

if TYPE_CHECKING:
    import torch

RANDOMIZED_MIN_SIDE = 8192  # `auto` uses randomized top-k when the longer side reaches this
QR_FIRST_RATIO = 2  # exact values + top-k of matrices at least this tall go through QR first
DEFAULT_NITER = 4  # power iterations: each multiplies the gap ratio sigma_{l+1}/sigma_k by itself twice more


class TopkMethod(str, Enum):
    auto = "auto"  # randomized for matrices with a side >= RANDOMIZED_MIN_SIDE (but see QR_FIRST_RATIO)
    exact = "exact"
    randomized = "randomized"


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
    """Results for a (B, m, n) stack, fp32, on the device it was computed on; rows of non-finite
    matrices (`finite[b]` False) are NaN.

    values (B, min(m, n)) descending | None; U (B, m, k), S (B, k), V (B, n, k) | None;
    reconstruction (B, m, n) | None; randomized: whether top-k came from the randomized method.
    """

    values: torch.Tensor | None
    U: torch.Tensor | None
    S: torch.Tensor | None
    V: torch.Tensor | None
    reconstruction: torch.Tensor | None
    finite: torch.Tensor
    randomized: bool


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without CUDA -> DeviceError."""
    import torch

    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} asked for, but torch sees no CUDA device "
                          f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)",
                          hint="use --device auto or --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown device {name!r}: {e}", hint="use auto, cpu, cuda or cuda:N") from None


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


def decompose(batch: torch.Tensor, request: SVDRequest = SVDRequest(),
              device: str | torch.device | None = None) -> SVDOutput:
    """Run `request` on a (B, m, n) stack (or one (m, n) matrix, treated as B=1) of any float dtype.

    Computes on `device` (default: the batch's own) in fp32 and returns tensors there.
    """
    import torch

    if batch.ndim == 2:
        batch = batch[None]
    if batch.ndim != 3:
        raise UsageError(f"decompose wants a (B, m, n) stack, got shape {tuple(batch.shape)}")
    B, m, n = batch.shape
    k = request.k
    if k:
        check_k("the matrix", (m, n), k)
    if request.reconstruct and not k:
        raise UsageError("a rank-k reconstruction needs k >= 1")
    # Upcast to fp32 before anything else: LAPACK and cuSOLVER have no bf16/fp16 SVD, and bf16's
    # 8-bit mantissa (relative spacing 2^-8) would swamp the small singular values and the
    # degree-level principal angles we measure (Sec. 4.1 of "The Path Not Taken").
    a = batch.to(device=device or batch.device, dtype=torch.float32)
    wide = m < n
    if wide:
        a = a.mT  # (B, n, m): torch's SVD is much faster on tall matrices
    finite = torch.isfinite(a).all(dim=(-2, -1))  # (B,)
    ok = bool(finite.all())
    if not ok:
        a = a[finite]  # LAPACK refuses NaN/inf: compute the finite ones, NaN-fill the others
    randomized = use_randomized((m, n), k, request.method, request.oversample, request.values)
    values = U = S = V = None
    if a.shape[0] == 0:
        pass
    elif k and not randomized and request.values and _qr_first((m, n)):
        values, U, V = _qr_svd(a, k)
        S = values[..., :k]
    elif k and not randomized:
        U, values, Vh = torch.linalg.svd(a, full_matrices=False)  # (b, M, r), (b, r), (b, r, N)
        U, S, V = U[..., :k], values[..., :k], Vh[..., :k, :].mT
    else:
        if request.values:
            values = torch.linalg.svdvals(a)
        if k:
            U, S, V = _randomized_topk(a, k, max(k, 10) if request.oversample is None else request.oversample,
                                       request.niter, request.seed)
    if not request.values:
        values = None
    if wide and U is not None:
        U, V = V, U  # A^T = U S V^T  <=>  A = V S U^T
    r = min(m, n)
    values = _fill(values, finite, (B, r), a.device) if request.values else None
    if k:
        U, S, V = _fill(U, finite, (B, m, k), a.device), _fill(S, finite, (B, k), a.device), \
            _fill(V, finite, (B, n, k), a.device)
    recon = (U * S[:, None, :]) @ V.mT if request.reconstruct else None  # (B, m, n)
    return SVDOutput(values, U, S, V, recon, finite, randomized)


def _fill(x: torch.Tensor | None, finite: torch.Tensor, shape: tuple, device) -> torch.Tensor:
    """Scatter results of the finite matrices into a NaN tensor of the full batch's `shape`."""
    import torch

    if x is not None and x.shape[0] == shape[0]:
        return x
    full = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    if x is not None:
        full[finite] = x
    return full


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


def _randomized_topk(a: torch.Tensor, k: int, oversample: int, niter: int, seed: int):
    """Top-k triplets of a tall (B, M, N) fp32 stack by a randomized range finder.

    Sketch width l = k + oversample. Each power iteration re-orthonormalizes (QR) so small
    singular directions are not lost to rounding; the error of the i-th value decays like
    (sigma_{l+1}/sigma_i)^(2*niter+1). Returns U (B, M, k), S (B, k), V (B, N, k).
    """
    import torch

    B, M, N = a.shape
    width = min(k + oversample, N)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(B, N, width, generator=gen, device=a.device, dtype=a.dtype)  # (B, N, l)
    q = torch.linalg.qr(a @ omega).Q  # (B, M, l): orthonormal basis of the sketched range
    for _ in range(niter):
        z = torch.linalg.qr(a.mT @ q).Q  # (B, N, l)
        q = torch.linalg.qr(a @ z).Q  # (B, M, l)
    small = q.mT @ a  # (B, l, N), wide: hand torch its transpose (N, l)
    ub, s, vh = torch.linalg.svd(small.mT, full_matrices=False)  # small^T = ub s vh
    # small = vh^T s ub^T: left vectors of `small` are vh^T, right ones ub
    return q @ vh.mT[..., :k], s[..., :k], ub[..., :k]


def svdvals(batch: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """(B, m, n) any float dtype -> (B, min(m, n)) fp32 singular values, descending."""
    return decompose(batch, SVDRequest(values=True), device).values


def topk(batch: torch.Tensor, k: int, method: TopkMethod = TopkMethod.auto,
         device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, m, n) -> U (B, m, k), S (B, k), V (B, n, k), fp32, with W ~ U diag(S) V^T.

    Exact for moderate matrices, randomized for those with a side >= RANDOMIZED_MIN_SIDE
    (`method` overrides). Each singular vector's sign is arbitrary, as in any SVD.
    """
    out = decompose(batch, SVDRequest(values=False, k=k, method=method), device)
    return out.U, out.S, out.V


def rank_k(batch: torch.Tensor, k: int, method: TopkMethod = TopkMethod.auto,
           device: str | torch.device | None = None) -> torch.Tensor:
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
