"""Spectrum drift: how far a fine-tune moved each weight matrix's singular values and top-k
singular subspaces (Sec. 4.1 and Fig. 4 of "The Path Not Taken: RLVR Provably Learns Off the
Principals"). RL fine-tunes keep the spectrum and the principal subspaces nearly fixed;
SFT rotates them.

Per 2-D weight W0 (base) and W1 (each fine-tune):

- principal angles between the top-k left singular subspaces, cos theta_i = sigma_i(U0k^T U1k),
  and between the top-k right ones (V), in degrees, ascending;
- normalized spectrum shift NSS = ||s(W1) - s(W0)||_2 / ||s(W0)||_2 over all singular values;
- top-k energy change (KF_k(W1) - KF_k(W0)) / KF_k(W0), KF_k = sum of the top k singular values
  (the Ky Fan k-norm);
- optionally the perturbation bounds, to see how tight they are: ||dW||_2 with Weyl's
  max_i |s_i(W1) - s_i(W0)| <= ||dW||_2, and Wedin's sin theta_max <= ||dW||_2 / delta.

Matrices are read one shape group at a time, in chunks that fit `max_memory`, and decomposed
as (B, m, n) stacks by `ckptprobe.analysis.svd`: only what the metrics need (all singular
values for NSS, top-k vectors for the angles), base once, then each fine-tune. A fine-tune's
matrix whose fp32 values are bitwise those of the base is not decomposed again: its angles, NSS
and energy change are exactly 0 (RL checkpoints leave many matrices untouched).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ckptprobe.analysis.grouping import KEYS, grouped
from ckptprobe.analysis.plan import Skipped, Want, check_distinct, plan_tensors
from ckptprobe.analysis.svd import (SVDRequest, SVDOutput, TopkMethod, decompose, resolve_device, shape_batches,
                                    svd_bytes, use_randomized)
from ckptprobe.analysis.weights import read_matrix
from ckptprobe.io.names import parse_name
from ckptprobe.io.sources import TensorSource

DEFAULT_K = 64
DEFAULT_MAX_MEMORY = 2 << 30


def default_k(shape: tuple[int, int]) -> int:
    """k when none is asked for: 64, or a quarter of the smaller side for small matrices
    (k = min(m, n) would make one side's subspace the whole space, with all angles 0)."""
    return max(1, min(DEFAULT_K, min(shape) // 4))


@dataclass(frozen=True)
class Bounds:
    """Perturbation bounds for one matrix and fine-tune, dW = W1 - W0 (values in fp32, angles in degrees).

    Weyl: weyl_max_shift = max_i |s_i(W1) - s_i(W0)| <= dw_norm2.
    Wedin (Stewart & Sun, Thm V.4.4, 2-norm form): max(sin theta_max(U), sin theta_max(V)) <=
    ||dW||_2 / delta for the top-k subspaces, with delta = s_k(W1) - s_{k+1}(W0) > 0 (the gap between
    one matrix's kept values and the other's dropped ones); the theorem holds with the roles of W0 and
    W1 swapped too, so delta is the larger of the two. It is near the base's gap_k = s_k(W0) - s_{k+1}(W0)
    when the shift is small. wedin_bound_deg is arcsin(min(1, dw_norm2 / delta)); 90 when delta <= 0.
    """

    dw_norm2: float
    weyl_max_shift: float
    gap_k: float
    wedin_delta: float
    wedin_bound_deg: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Comparison:
    """One matrix of one fine-tune against the base.

    angles_u / angles_v: k principal angles in degrees, ascending. nss_scope is "all" (every
    singular value) or "top-k" (--fast on a matrix whose top-k came from the randomized method:
    only the k leading values are known). values: the fine-tune's singular values, fp32 (kept for
    plots and --singular-values). error: why metrics are missing (non-finite entries, an all-zero base), else None.
    """

    finetuned: str
    nss: float | None
    nss_scope: str
    angles_u: tuple[float, ...]
    angles_v: tuple[float, ...]
    topk_energy_change: float | None
    values: np.ndarray | None = field(compare=False)
    bounds: Bounds | None = None
    error: str | None = None

    @property
    def max_angle_u(self) -> float | None:
        return max(self.angles_u) if self.angles_u else None

    @property
    def max_angle_v(self) -> float | None:
        return max(self.angles_v) if self.angles_v else None

    @property
    def mean_angle_u(self) -> float | None:
        return float(np.mean(self.angles_u)) if self.angles_u else None

    @property
    def mean_angle_v(self) -> float | None:
        return float(np.mean(self.angles_v)) if self.angles_v else None


@dataclass(frozen=True)
class MatrixSpectrum:
    """One weight matrix: its base spectrum and one `Comparison` per fine-tune (in argument order).

    shape is the matrix's as stored; transposed is True for GPT-2 Conv1D weights, analysed as (out, in) so that
    U is always the output space. randomized: top-k vectors came from the randomized method.
    """

    name: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    transposed: bool
    k: int
    randomized: bool
    base_values: np.ndarray | None = field(compare=False)
    comparisons: tuple[Comparison, ...]
    expert: int | None = None  # the matrix's index in a 3-D expert stack `(E, out, in)`

    @property
    def group(self) -> str:
        return parse_name(self.name).group

    def rows(self, singular_values: bool = False) -> list[dict]:
        """Flat records, one per fine-tune: the `matrices[]` entries of the JSON output."""
        out = []
        for c in self.comparisons:
            row = {"name": self.name, "expert": self.expert, "finetuned": c.finetuned, "layer": self.layer,
                   "module": self.module, "group": self.group,
                   "shape": list(self.shape), "k": self.k, "randomized": self.randomized,
                   "nss": c.nss, "nss_scope": c.nss_scope, "topk_energy_change": c.topk_energy_change,
                   "max_angle_u": c.max_angle_u, "max_angle_v": c.max_angle_v,
                   "mean_angle_u": c.mean_angle_u, "mean_angle_v": c.mean_angle_v,
                   "angles_u": list(c.angles_u), "angles_v": list(c.angles_v), "error": c.error}
            if c.bounds:
                row |= c.bounds.to_dict()
            if singular_values:
                row["singular_values_base"] = None if self.base_values is None else self.base_values.tolist()
                row["singular_values"] = None if c.values is None else c.values.tolist()
            out.append(row)
        return out


def pool(finetuned: str, matrices: Sequence[MatrixSpectrum]) -> dict:
    """One fine-tune's comparisons of `matrices` pooled into one record (matrices with an error left out;
    `matrices` counts the others), each metric the group's own rather than a mean of per-matrix ratios:

    - nss: ||s1 - s0|| / ||s0|| over the group's singular values taken together, i.e.
      sqrt(sum_i ||s1_i - s0_i||^2 / sum_i ||s0_i||^2), with the values each matrix's NSS used (all, or
      the top k with --fast: `nss_scope` is then "top-k", or "mixed" when the group has both);
    - topk_energy_change: sum_i (KF_k(W1_i) - KF_k(W0_i)) / sum_i KF_k(W0_i), the relative change of the
      group's summed top-k energy (each matrix's change weighs by its base's KF_k, the sum of its k
      largest singular values);
    - max_angle_u/v: the largest principal angle of any matrix; mean_angle_u/v: the mean of all the
      group's principal angles (a matrix weighs by its k).

    None where the group has no matrix (or a zero spectrum).
    """
    count, scopes, angles = 0, set(), {"u": [], "v": []}
    d_sq = s_sq = kf_num = kf_den = 0.0
    for m in matrices:
        c = next(c for c in m.comparisons if c.finetuned == finetuned)
        if c.error is not None:
            continue
        count += 1
        scopes.add(c.nss_scope)
        s0, s1 = m.base_values.astype(np.float64), c.values.astype(np.float64)
        d_sq, s_sq = d_sq + float((s1 - s0) @ (s1 - s0)), s_sq + float(s0 @ s0)
        kf0 = float(s0[:m.k].sum())
        if kf0 > 0:
            kf_num, kf_den = kf_num + c.topk_energy_change * kf0, kf_den + kf0
        angles["u"] += c.angles_u
        angles["v"] += c.angles_v
    out = {"finetuned": finetuned, "matrices": count, "nss": math.sqrt(d_sq / s_sq) if s_sq > 0 else None,
           "nss_scope": (next(iter(scopes)) if len(scopes) == 1 else "mixed") if scopes else None,
           "topk_energy_change": kf_num / kf_den if kf_den > 0 else None}
    for side, vals in angles.items():
        out[f"max_angle_{side}"] = max(vals) if vals else None
        out[f"mean_angle_{side}"] = float(np.mean(vals)) if vals else None
    return out


@dataclass(frozen=True)
class SpectrumResult:
    base: str
    finetuned: tuple[str, ...]
    k: int | None  # as asked; None: default_k per matrix
    method: str
    fast: bool
    device: str
    matrices: tuple[MatrixSpectrum, ...]
    skipped: tuple[Skipped, ...]

    def rows(self, by: str = "tensor", singular_values: bool = False) -> list[dict]:
        """Flat records: one per matrix and fine-tune (the `matrices[]` entries of the JSON output; every
        singular value with `singular_values`), or per module, layer or group and fine-tune, pooled as
        `pool` says, groups in the order of `grouping.order`, fine-tunes in argument order within a group."""
        if by == "tensor":
            return [r for m in self.matrices for r in m.rows(singular_values)]
        return [{by: k, **pool(ft, ms)} for k, ms in grouped(self.matrices, by).items() for ft in self.finetuned]

    @property
    def total(self) -> dict[str, dict]:
        """Every matrix pooled (as `pool` says), per fine-tune (in argument order)."""
        return {ft: pool(ft, self.matrices) for ft in self.finetuned}

    def to_dict(self, singular_values: bool = False) -> dict:
        total = self.total
        return {
            "command": "spectrum", "base": self.base, "finetuned": list(self.finetuned), "k": self.k,
            "method": self.method, "fast": self.fast, "device": self.device,
            "matrices": self.rows("tensor", singular_values),
            "groups": {key: self.rows(key) for key in KEYS},
            "total": [total[ft] for ft in self.finetuned],
            "skipped": [s.to_dict() for s in self.skipped],
        }


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, ascending) between the column spans of orthonormal a, b (B, m, k).

    cos theta_i = sigma_i(a^T b). Small angles are taken from their sines instead,
    sin theta = sigma(b - a a^T b), because arccos is ill-conditioned near 1 (the approach of
    scipy.linalg.subspace_angles). Computed in float64. Returns (B, k) float64.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = a.swapaxes(-1, -2) @ b  # (B, k, k)
    cos = np.linalg.svd(m, compute_uv=False).clip(0, 1)  # descending -> angles ascending
    sin = np.linalg.svd(b - a @ m, compute_uv=False).clip(0, 1)[..., ::-1]  # ascending -> angles ascending
    theta = np.where(cos ** 2 >= 0.5, np.arcsin(sin), np.arccos(cos))
    return np.degrees(theta)


def _nss(s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """(B, r) fp32 -> (B,) float64: ||s1 - s0||_2 / ||s0||_2."""
    s0, s1 = s0.astype(np.float64), s1.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero base: its rows get an error
        return np.linalg.norm(s1 - s0, axis=-1) / np.linalg.norm(s0, axis=-1)


def _bounds(dw_norm: float, s0: np.ndarray, s1: np.ndarray, k: int) -> Bounds:
    r = min(len(s0), len(s1))
    weyl = float(np.abs(s1[:r].astype(np.float64) - s0[:r]).max())
    nxt0 = float(s0[k]) if k < len(s0) else 0.0
    nxt1 = float(s1[k]) if k < len(s1) else 0.0
    delta = max(float(s1[k - 1]) - nxt0, float(s0[k - 1]) - nxt1)
    bound = 90.0 if delta <= 0 else math.degrees(math.asin(min(1.0, dw_norm / delta)))
    return Bounds(dw_norm, weyl, float(s0[k - 1]) - nxt0, delta, bound)


def spectrum(base: TensorSource, finetuned: Sequence[TensorSource], k: int | None = None,
             include: Sequence[str] = (), exclude: Sequence[str] = (), device: str = "auto",
             max_memory: int = DEFAULT_MAX_MEMORY, method: TopkMethod = TopkMethod.auto, fast: bool = False,
             bounds: bool = False, progress: Callable[[int], None] | None = None) -> SpectrumResult:
    """Compare every weight matrix of each of `finetuned` against `base` (2-D floating-point tensors;
    a 3-D expert stack `(E, out, in)` as E matrices).

    k: top-k subspace size for every matrix (None: `default_k` per matrix); a matrix whose smaller
    side is below k (or below 2: one singular value, no subspace) is skipped with that reason.
    fast: for large matrices (a side >= RANDOMIZED_MIN_SIDE), skip the full singular values, take top-k
    from the randomized method and compute NSS over the top k only (nss_scope "top-k"); ignored with
    `bounds`, which needs all values. bounds: also `Bounds` per comparison (one more singular-value pass, of dW, per matrix and fine-tune).
    progress, if given, is called with the bytes read after each chunk.
    """
    check_distinct(finetuned)
    dev = resolve_device(device)
    plan = plan_tensors(base, finetuned, Want.matrices, include, exclude, k=k, default_k=default_k, min_side=2)
    # one unit per matrix: (name, index in an expert stack or None) -> (analysed shape, transposed, k)
    units: dict[tuple[str, int | None], tuple[tuple[int, int], bool, int]] = {}
    params = {p.name: p.param for p in plan.tensors}
    for p in plan.tensors:
        transposed = p.param.transposed
        shape = tuple(reversed(p.matrix_shape)) if transposed else p.matrix_shape
        for i in range(p.matrices) if p.stacked else [None]:
            units[(p.name, i)] = (shape, transposed, p.k)

    def request(shape: tuple[int, int], kk: int) -> SVDRequest:
        # the bounds need every singular value (Weyl) and s_{k+1} (Wedin): --fast yields to --bounds
        skip_values = fast and not bounds and use_randomized(shape, kk, method, values=False)
        return SVDRequest(values=not skip_values, k=kk, method=method)

    def load(source: TensorSource, chunk: list[tuple[str, int | None]]) -> np.ndarray:
        """(B, m, n) float32, on CPU (the engine copies it to `dev`), each matrix written once: one matrix
        alone (an embedding) is a view of the array `read_matrix` made, not a copy of it."""
        out = None
        for i, unit in enumerate(chunk):
            w = read_matrix(source, *unit)
            w = np.ascontiguousarray(w.T if units[unit][1] else w)
            if len(chunk) == 1:
                return w[None]
            out = np.empty((len(chunk), *w.shape), np.float32) if out is None else out
            out[i] = w
        return out

    def bytes_per_matrix(shape) -> int:  # base matrix and outputs are held while each fine-tune is decomposed
        kk = k or default_k(shape)
        return 2 * svd_bytes(shape, request(shape, kk)) + 4 * shape[0] * shape[1]

    # chunks hold one k (k differs only between shapes, and a chunk has one shape)
    results: dict[str, MatrixSpectrum] = {}
    for shape, chunk in shape_batches(((u, v[0]) for u, v in units.items()), max_memory, bytes_per_matrix):
        kk = units[chunk[0]][2]
        req = request(shape, kk)
        w0 = load(base, chunk)
        b0 = decompose(w0, req, dev)
        per_ft: list[list[Comparison]] = [[] for _ in chunk]
        for src in finetuned:
            w1 = load(src, chunk)
            moved = [i for i, same in enumerate(_bitwise_equal(w0, w1)) if not same]
            comps = dict.fromkeys(range(len(chunk)))
            if moved:
                every = len(moved) == len(chunk)  # the usual case: no copy of a subset
                b0m, w1 = (b0, w1) if every else (_take(b0, moved), w1[moved])
                b1 = decompose(w1, req, dev)
                dw = (decompose(w1 - (w0 if every else w0[moved]), SVDRequest(values=True), dev).values[:, 0].tolist()
                      if bounds else None)
                comps.update(zip(moved, _compare(b0m, b1, kk, src.ref, req.values, dw)))
            del w1
            for i, c in comps.items():
                per_ft[i].append(c or _unchanged(b0, i, kk, src.ref, req.values, bounds))
        del w0
        for i, (name, expert) in enumerate(chunk):
            p = params[name]
            stored = base.info(name).shape[-2:]
            base_vals = _values(b0, i, req.values)
            err = ("base has NaN/inf entries" if not bool(b0.finite[i]) else
                   "base matrix is all zeros: no spectrum or subspace to compare" if not b0.S[i].any() else None)
            comps = tuple(c if err is None else Comparison(c.finetuned, None, c.nss_scope, (), (), None,
                                                            c.values, None, err) for c in per_ft[i])
            results[(name, expert)] = MatrixSpectrum(name, p.layer, p.module, stored, p.transposed, kk,
                                                     b0.randomized, base_vals, comps, expert)
        if progress:
            progress(sum(s.info(n).itemsize for n, _ in chunk for s in (base, *finetuned)) * shape[0] * shape[1])
    matrices = tuple(results[u] for u in units)  # back in checkpoint order
    return SpectrumResult(base.ref, tuple(f.ref for f in finetuned), k, method.value, fast, str(dev),
                          matrices, plan.skipped)


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> list[bool]:
    """(B, m, n) float32 stacks -> per matrix, whether every entry has the same bits (so -0.0 vs
    +0.0 differ, and equal NaNs match)."""
    return (a.view(np.int32) == b.view(np.int32)).reshape(len(a), -1).all(1).tolist()


def _take(out: SVDOutput, idx: list[int]) -> SVDOutput:
    """The outputs of the matrices `idx` of a stack."""
    pick = (lambda t: None if t is None else t[idx])
    return SVDOutput(pick(out.values), pick(out.U), pick(out.S), pick(out.V), pick(out.reconstruction),
                     out.finite[idx], out.randomized)


def _unchanged(b0: SVDOutput, i: int, k: int, ref: str, full: bool, bounds: bool) -> Comparison:
    """A fine-tune's matrix i bitwise equal to the base's: the base's values, every metric exactly 0
    (a non-finite base gets its error from the caller)."""
    scope = "all" if full else "top-k"
    vals = _values(b0, i, full)
    if vals is None:
        return Comparison(ref, None, scope, (), (), None, None, None, "fine-tune has NaN/inf entries")
    bd = _bounds(0.0, vals, vals, k) if bounds else None
    return Comparison(ref, 0.0, scope, (0.0,) * k, (0.0,) * k, 0.0, vals, bd)


def _values(out: SVDOutput, i: int, full: bool) -> np.ndarray | None:
    v = out.values if full else out.S
    return None if not bool(out.finite[i]) else v[i]


def _compare(b0: SVDOutput, b1: SVDOutput, k: int, ref: str, full: bool,
             dw_norms: list[float] | None) -> list[Comparison]:
    """Comparisons of a chunk: base outputs b0 vs fine-tune outputs b1 (same request)."""
    s0, s1 = (b0.values, b1.values) if full else (b0.S, b1.S)  # (B, r) or (B, k)
    nss = _nss(s0, s1).tolist()
    ky0, ky1 = b0.S.sum(-1, dtype=np.float64), b1.S.sum(-1, dtype=np.float64)  # Ky Fan k-norms
    with np.errstate(divide="ignore", invalid="ignore"):
        energy = ((ky1 - ky0) / ky0).tolist()
    ok = (b0.finite & b1.finite)[:, None, None]  # NaN-filled factors -> 0 (their rows get an error below)
    au = principal_angles(np.where(ok, b0.U, 0), np.where(ok, b1.U, 0))
    av = principal_angles(np.where(ok, b0.V, 0), np.where(ok, b1.V, 0))
    scope = "all" if full else "top-k"
    out = []
    for i in range(s0.shape[0]):
        if not bool(b1.finite[i]):
            out.append(Comparison(ref, None, scope, (), (), None, None, None, "fine-tune has NaN/inf entries"))
            continue
        vals = s1[i]
        bd = None
        if dw_norms is not None and bool(b0.finite[i]):
            bd = _bounds(dw_norms[i], s0[i], vals, k)
        out.append(Comparison(ref, nss[i], scope, tuple(au[i].tolist()), tuple(av[i].tolist()), energy[i],
                              vals, bd))
    return out
