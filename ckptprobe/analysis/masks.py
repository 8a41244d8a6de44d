"""Masks over a base model's weight matrices, and set algebra over them.

"The Path Not Taken" (Sec. 4.2, 5.1) compares where a fine-tune's updates land with two
masks computed from the base weights W0 alone:

- principal `M_princ = Top_alpha(|W0^(k)|)`: the alpha fraction of entries of largest
  magnitude in the rank-k SVD reconstruction W0^(k) (the weights that carry the top-k
  singular directions);
- low-magnitude `M_low = Bottom_alpha(|W0|)`, or with `LowThreshold.mean` every entry below
  the matrix's mean magnitude (the paper's choice for training masks).

RLVR updates avoid principal weights and prefer low-magnitude ones, so
`safe = low | ~principal` is a one-shot mask for sparse training. Masks from runs are
`update` (what one fine-tune changed, the bf16-aware rule of `analysis.update`) and
`consensus` (changed in at least a fraction `min_agree` of several runs); `random` has the
per-matrix density of another kind, at uniformly random positions.

Counting rule (every Top/Bottom selection): a matrix of n entries keeps exactly
`round(alpha * n)` of them, alpha taken as the decimal it is written as and halves rounded
up (alpha = 0.15, n = 10 keeps 2), so alpha = 0 keeps none and alpha = 1 keeps all, and a
tiny alpha can keep none. Entries tied at the threshold value are taken in row-major index
order, lowest first, so a mask is a deterministic function of its inputs. Only 2-D float
tensors get masks computed; everything else follows an explicit `Vectors` policy.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from ckptprobe.analysis.bf16 import float32_to_bf16_bits, to_float32
from ckptprobe.analysis.pairing import selected
from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA, CompareMode, default_mode, update_mask
from ckptprobe.errors import InvalidCheckpointError, TensorMismatchError, UsageError
from ckptprobe.io._safetensors import FLOAT_DTYPES
from ckptprobe.io.maskfile import PackedMask, fingerprint
from ckptprobe.io.names import MODULE_ORDER, parse_name
from ckptprobe.io.sources import TensorSource

DEFAULT_ALPHA = 0.05
MAX_RANK = 64


class Kind(str, Enum):
    principal = "principal"
    non_principal = "non-principal"
    low = "low"
    safe = "safe"
    random = "random"
    update = "update"
    consensus = "consensus"


class LowThreshold(str, Enum):
    alpha = "alpha"  # Bottom_alpha(|W0|): exactly round(alpha * n) entries
    mean = "mean"  # |W0| < mean(|W0|) of the matrix: ~57.5% of a Gaussian matrix


class Vectors(str, Enum):
    """What a mask file says for tensors it computes no mask for (1-D norms and biases, tensors
    left out by include/exclude, non-float tensors): all trainable or all frozen."""

    train = "train"
    freeze = "freeze"


# Kinds defined by other kinds; the rest are atoms computed per matrix.
_MACROS = {"non-principal": "~principal", "safe": "low | ~principal"}
ATOMS = ("principal", "low", "random", "update", "consensus")


# ---------------------------------------------------------------- counting and selection

def check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise UsageError(f"--alpha {alpha} is outside [0, 1]", hint="alpha is a fraction, e.g. 0.05 for 5%")


def keep_count(alpha: float, n: int) -> int:
    """round(alpha * n), halves up, alpha read as the shortest decimal that prints it (0.15 -> 0.15 exactly)."""
    check_alpha(alpha)
    return int((Decimal(repr(float(alpha))) * n).to_integral_value(ROUND_HALF_UP))


def select_largest(values: np.ndarray, count: int) -> np.ndarray:
    """Bool mask, shaped like `values` (any real dtype, no NaN), of its `count` largest entries.

    Ties at the threshold go to the lowest row-major indices. Cost: one partition (a copy of
    `values`) and two comparisons.
    """
    return _select(values, count, largest=True)


def select_smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of the `count` smallest entries of `values`; ties to the lowest row-major indices."""
    return _select(values, count, largest=False)


def _select(values: np.ndarray, count: int, largest: bool) -> np.ndarray:
    flat = values.reshape(-1)
    n = flat.size
    if not 0 <= count <= n:
        raise ValueError(f"cannot select {count} of {n} entries")
    out = np.zeros(n, bool)
    if count == n:
        out[:] = True
    elif count:
        pos = n - count if largest else count - 1
        t = np.partition(flat, pos)[pos]  # the count-th largest (smallest) value
        np.greater(flat, t, out=out) if largest else np.less(flat, t, out=out)
        need = count - int(np.count_nonzero(out))
        if need:  # entries equal to t: take the first `need` of them in index order
            out[np.flatnonzero(flat == t)[:need]] = True
    return out.reshape(values.shape)


def below_mean(a: np.ndarray) -> np.ndarray:
    """`a < mean(a)` for a float32 array, the mean taken in float64, compared exactly.

    The comparison runs in float32 against the smallest float32 >= the float64 mean, which
    gives the same answer as comparing in float64 without an 8-byte copy of the matrix.
    """
    mean = np.float64(np.mean(a, dtype=np.float64))
    t = np.float32(mean)
    if np.float64(t) < mean:
        t = np.nextafter(t, np.float32(np.inf))
    return a < t


def default_rank(shape: tuple[int, ...]) -> int:
    """k when none is given: min(64, min(m, n) // 16), at least 1.

    64 for 1536-wide and larger matrices (Qwen2.5-1.5B and up), 16 for a 256 x 1536 k_proj,
    8 for the 128-wide example family, 2 for a 32-wide test model: the principal subspace
    stays a small slice of each matrix's spectrum.
    """
    return max(1, min(MAX_RANK, min(shape) // 16))


def principal_mask(w: np.ndarray, k: int, alpha: float, device=None, method: str = "auto") -> np.ndarray:
    """(m, n) float32 -> bool (m, n): Top_alpha(|W^(k)|), W^(k) the rank-k SVD reconstruction.

    The reconstruction comes from the SVD engine (`analysis.svd.rank_k`): an exact thin SVD
    for moderate matrices, a randomized top-k range finder for large ones (seeded, so masks
    are reproducible), computed on `device` (default CPU).
    """
    if k == min(w.shape):  # full rank: W^(k) is W itself; an SVD would only add rounding noise to ties
        return select_largest(np.abs(w), keep_count(alpha, w.size))
    import torch

    from ckptprobe.analysis.svd import rank_k

    recon = rank_k(torch.from_numpy(np.ascontiguousarray(w, np.float32))[None], k, method, device)[0]
    a = recon.abs_().cpu().numpy()  # (m, n) float32
    return select_largest(a, keep_count(alpha, a.size))


def low_mask(w: np.ndarray, alpha: float, threshold: LowThreshold = LowThreshold.alpha) -> np.ndarray:
    """(m, n) float -> bool (m, n): Bottom_alpha(|W|), or |W| < mean |W| for `LowThreshold.mean`."""
    a = np.abs(w)
    if threshold == LowThreshold.mean:
        return below_mean(a)
    return select_smallest(a, keep_count(alpha, a.size))


def random_mask(shape: tuple[int, ...], count: int, seed: int, name: str) -> np.ndarray:
    """Exactly `count` True entries at uniformly random positions, seeded by `seed` and the tensor `name`.

    The name enters the seed so a tensor's mask does not depend on which others were selected.
    """
    name_key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng([seed, name_key])
    keys = rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)  # ties are rare and broken by index
    return select_smallest(keys, count)


# ---------------------------------------------------------------- set algebra

@dataclass(frozen=True)
class Expr:
    """A parsed mask expression: op is "atom" (args: (name,)), "not" (one Expr), or "and", "or", "xor" (two)."""

    op: str
    args: tuple

    def atoms(self) -> set[str]:
        return {self.args[0]} if self.op == "atom" else set().union(*(a.atoms() for a in self.args))

    def evaluate(self, atom: Callable[[str], np.ndarray]) -> np.ndarray:
        """The bool mask, getting each atom's mask from `atom(name)`."""
        if self.op == "atom":
            return atom(self.args[0])
        if self.op == "not":
            return ~self.args[0].evaluate(atom)
        a, b = (x.evaluate(atom) for x in self.args)
        return {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}[self.op](a, b, out=a)

    def __str__(self) -> str:
        """Canonical text: every binary operation parenthesized, except the outermost."""
        text = self._text()
        return text[1:-1] if self.op in ("and", "or", "xor") else text

    def _text(self) -> str:
        if self.op == "atom":
            return self.args[0]
        if self.op == "not":
            return "~" + self.args[0]._text()
        sym = {"and": "&", "or": "|", "xor": "^"}[self.op]
        return "(" + f" {sym} ".join(a._text() for a in self.args) + ")"


_TOKEN = re.compile(r"\s*(?:([A-Za-z][\w-]*)|([|&^~()]))")
_BINARY = (("|", "or"), ("^", "xor"), ("&", "and"))  # loosest first, as in Python


def parse_expression(text: str) -> Expr:
    """Parse `text` over kind names with ~ (not), & (and), ^ (xor), | (or) and parentheses.

    Precedence as in Python: ~ binds tightest, then &, ^, |. `non-principal` and `safe`
    expand to `~principal` and `low | ~principal`. No eval: a small recursive-descent parser.
    """
    tokens, pos = [], 0
    text_stripped = text.rstrip()
    while pos < len(text_stripped):
        m = _TOKEN.match(text_stripped, pos)
        if not m:
            raise UsageError(f"mask expression {text!r}: unexpected {text_stripped[pos:].strip()[:1]!r} "
                             f"at position {pos}", hint="use kind names with | & ^ ~ and parentheses")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    if not tokens:
        raise UsageError("empty mask expression", hint="e.g. --expr 'low | ~principal'")
    i = 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def take():
        nonlocal i
        i += 1
        return tokens[i - 1]

    def binary(level: int) -> Expr:
        if level == len(_BINARY):
            return unary()
        sym, op = _BINARY[level]
        left = binary(level + 1)
        while peek() == sym:
            take()
            left = Expr(op, (left, binary(level + 1)))
        return left

    def unary() -> Expr:
        tok = peek()
        if tok is None:
            raise UsageError(f"mask expression {text!r} ends too early", hint="is an operand or ')' missing?")
        take()
        if tok == "~":
            return Expr("not", (unary(),))
        if tok == "(":
            inner = binary(0)
            if peek() != ")":
                raise UsageError(f"mask expression {text!r}: missing ')'")
            take()
            return inner
        if tok in ("|", "&", "^", ")"):
            raise UsageError(f"mask expression {text!r}: unexpected {tok!r}", hint="an operand is missing")
        if tok in _MACROS:
            return parse_expression(_MACROS[tok])
        if tok not in ATOMS:
            raise UsageError(f"mask expression {text!r}: unknown name {tok!r}",
                             hint=f"kinds are {', '.join(k.value for k in Kind)}")
        return Expr("atom", (tok,))

    try:
        expr = binary(0)
    except RecursionError:
        raise UsageError(f"mask expression nested too deeply ({len(text)} characters)") from None
    if i != len(tokens):
        raise UsageError(f"mask expression {text!r}: unexpected {tokens[i]!r}", hint="is an operator missing?")
    return expr


# ---------------------------------------------------------------- per-matrix masks

@dataclass(frozen=True)
class MaskSpec:
    """Everything besides the base and runs that defines a mask.

    rank None: `default_rank` per matrix. like: the expression whose per-matrix density
    `random` copies. min_agree: the fraction of runs that must have changed an entry for
    `consensus` (an entry is kept when changed in at least ceil(min_agree * runs) runs, and
    at least one). mode/eta/atol: the update rule (`analysis.update`); mode None picks
    bitwise for equal dtypes, bf16 otherwise. method/device: for the SVD engine.
    """

    expression: str
    rank: int | None = None
    alpha: float = DEFAULT_ALPHA
    low_threshold: LowThreshold = LowThreshold.alpha
    like: str | None = None
    seed: int = 0
    min_agree: float = 1.0
    mode: CompareMode | None = None
    eta: float = DEFAULT_ETA
    atol: float = DEFAULT_ATOL
    method: str = "auto"
    device: str | None = None

    def needed_runs(self, n: int) -> int:
        return max(1, math.ceil(round(self.min_agree * n, 9)))


class MatrixMasks:
    """The atom masks of one base matrix, computed on first use and cached.

    name/raw/dtype: the base tensor in storage form; runs: [(storage array, dtype)] of the
    same tensor in each run (`update` needs one, `consensus` several).
    """

    def __init__(self, name: str, raw: np.ndarray, dtype: str, spec: MaskSpec,
                 runs: Sequence[tuple[np.ndarray, str]] = ()):
        self.name, self.raw, self.dtype, self.spec, self.runs = name, raw, dtype, spec, runs
        self.rank = None  # k used, once the principal mask is computed
        self._w = None
        self._cache: dict[str, np.ndarray] = {}

    @property
    def w(self) -> np.ndarray:
        if self._w is None:
            w = to_float32(self.raw, self.dtype)
            if not np.isfinite(w).all():
                raise InvalidCheckpointError(f"{self.name}: the base tensor holds NaN or inf; its principal and "
                                             "low-magnitude masks are undefined",
                                             hint="--exclude it (it then follows --vectors)")
            self._w = w
        return self._w

    def __call__(self, atom: str) -> np.ndarray:
        """The mask of `atom` (a fresh copy: callers may modify it)."""
        if atom not in self._cache:
            self._cache[atom] = self._compute(atom)
        return self._cache[atom].copy()

    def _updates(self) -> list[np.ndarray]:
        s = self.spec
        out = []
        for raw, dtype in self.runs:
            mode = s.mode or default_mode(self.dtype, dtype)
            out.append(update_mask(self.raw, raw, self.dtype, dtype, mode, s.eta, s.atol)[0])
        return out

    def _compute(self, atom: str) -> np.ndarray:
        s = self.spec
        if atom == "principal":
            from ckptprobe.analysis.svd import check_k

            k = default_rank(self.raw.shape) if s.rank is None else s.rank
            check_k(self.name, self.raw.shape, k)
            self.rank = k
            return principal_mask(self.w, k, s.alpha, s.device, s.method)
        if atom == "low":
            return low_mask(self.w, s.alpha, s.low_threshold)
        if atom == "update":
            return self._updates()[0]
        if atom == "consensus":
            changed = np.zeros(self.raw.shape, np.uint16)
            for m in self._updates():
                changed += m
            return changed >= s.needed_runs(len(self.runs))
        if atom == "random":
            like = parse_expression(s.like).evaluate(self)
            return random_mask(self.raw.shape, int(np.count_nonzero(like)), s.seed, self.name)
        raise ValueError(atom)


# ---------------------------------------------------------------- whole models

@dataclass(frozen=True)
class TensorMask:
    """One tensor's mask: `computed` (a 2-D matrix) or set by the vectors policy; `rank` is the k used."""

    name: str
    layer: int | None
    module: str
    shape: tuple[int, ...]
    computed: bool
    count: int  # trainable (True) entries
    rank: int | None = None
    bits: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def density(self) -> float | None:
        return self.count / self.numel if self.numel else None

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "module": self.module, "shape": list(self.shape),
                "computed": self.computed, "rank": self.rank, "numel": self.numel, "trainable": self.count,
                "density": self.density}


def group_densities(tensors: Sequence[TensorMask], key: str) -> list[dict]:
    """Trainable counts summed per "module" or "layer" (layers ascending, None last), with densities."""
    sums: dict = {}
    for t in tensors:
        k = getattr(t, key)
        n, c, nt = sums.get(k, (0, 0, 0))
        sums[k] = (n + t.numel, c + t.count, nt + 1)
    if key == "module":
        order = {m: i for i, m in enumerate(MODULE_ORDER)}
        items = sorted(sums.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    else:
        items = sorted(sums.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    return [{key: k, "tensors": nt, "numel": n, "trainable": c, "density": c / n if n else None}
            for k, (n, c, nt) in items]


@dataclass(frozen=True)
class MaskBuild:
    """Masks for every tensor of a base, bit-packed, with the recipe and base fingerprints to write."""

    recipe: dict
    tensors: tuple[TensorMask, ...]
    fingerprints: dict

    def packed(self) -> dict[str, PackedMask]:
        return {t.name: PackedMask(t.shape, t.bits, t.count, {"computed": t.computed, "rank": t.rank})
                for t in self.tensors}

    @property
    def total(self) -> dict:
        n, c = sum(t.numel for t in self.tensors), sum(t.count for t in self.tensors)
        return {"numel": n, "trainable": c, "density": c / n if n else None}

    def to_dict(self) -> dict:
        return {"command": "masks", **self.recipe, "tensors": [t.to_dict() for t in self.tensors],
                "groups": {k: group_densities(self.tensors, k) for k in ("module", "layer")}, "total": self.total}


def fingerprint_as(raw: np.ndarray, dtype: str, target: str) -> str:
    """The fingerprint of storage array `raw` (safetensors `dtype`) after a cast to `target`'s dtype.

    A mask records the fingerprint of the base as stored (e.g. BF16); a copy of that base
    saved in another float dtype (an fp32 export) matches when casting it back gives the same
    bits, as `ckptprobe.train.mask_updates` compares parameters.
    """
    if target == dtype or dtype not in FLOAT_DTYPES or target not in ("BF16", "F16", "F32", "F64"):
        return fingerprint(raw, dtype)
    values = raw.astype(np.float64) if dtype == "F64" else to_float32(raw, dtype)
    cast = {"BF16": lambda x: float32_to_bf16_bits(x.astype(np.float32)), "F16": lambda x: x.astype(np.float16),
            "F32": lambda x: x.astype(np.float32), "F64": lambda x: x.astype(np.float64)}[target]
    return fingerprint(cast(values), target)


def is_matrix(dtype: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and dtype in FLOAT_DTYPES and min(shape) > 0


def _recipe(spec: MaskSpec, expr: Expr, kind: str | None, base: TensorSource, runs: Sequence[TensorSource],
            vectors: Vectors | None) -> dict:
    atoms = expr.atoms() | (parse_expression(spec.like).atoms() if "random" in expr.atoms() else set())
    r: dict = {"kind": kind or "expression", "expression": str(expr), "base": base.ref}
    if atoms & {"principal", "low"}:
        r |= {"alpha": spec.alpha}
    if "principal" in atoms:
        r |= {"k": "auto" if spec.rank is None else spec.rank,
              "topk_method": str(getattr(spec.method, "value", spec.method))}
    if "low" in atoms:
        r |= {"low_threshold": spec.low_threshold.value}
    if "random" in expr.atoms():
        r |= {"like": spec.like, "seed": spec.seed}
    if atoms & {"update", "consensus"}:
        r |= {"from": [s.ref for s in runs], "mode": spec.mode.value if spec.mode else "auto",
              "eta": spec.eta, "atol": spec.atol}
    if "consensus" in atoms:
        r |= {"min_agree": spec.min_agree, "min_runs": spec.needed_runs(len(runs))}
    r["vectors"] = vectors.value if vectors else None
    return r


def build_masks(base: TensorSource, spec: MaskSpec, runs: Sequence[TensorSource] = (), kind: str | None = None,
                include: Sequence[str] = (), exclude: Sequence[str] = (), vectors: Vectors | None = None,
                progress: Callable[[int], None] | None = None) -> MaskBuild:
    """Compute `spec.expression` for every selected 2-D float tensor of `base`, one matrix at a time.

    Every other tensor of the base (1-D, left out by include/exclude, non-float) gets an
    all-True (`Vectors.train`) or all-False (`Vectors.freeze`) mask; `vectors` None refuses a
    base that has such tensors, so the choice is always explicit. `runs` are the fine-tunes
    for `update` (exactly one) and `consensus` (two or more); each must hold every computed
    tensor with the base's shape. Memory: one matrix and its masks at a time, plus the
    packed bits (n/8 bytes per tensor). `progress` gets base bytes done after each tensor.
    """
    expr = parse_expression(spec.expression)
    atoms = expr.atoms()
    check_alpha(spec.alpha)
    if "random" in atoms:
        if not spec.like:
            raise UsageError("the random kind needs --like KIND: the kind whose per-matrix density it copies")
        if "random" in parse_expression(spec.like).atoms():
            raise UsageError("--like cannot itself be random")
        atoms = atoms | parse_expression(spec.like).atoms()
    if spec.rank is not None and spec.rank < 1:
        raise UsageError(f"-k {spec.rank}: the rank must be at least 1")
    if not 0 < spec.min_agree <= 1:
        raise UsageError(f"--min-agree {spec.min_agree} is outside (0, 1]")
    if "update" in atoms and "consensus" in atoms:
        raise UsageError("update and consensus cannot be combined: update reads one --from run, consensus several")
    if "update" in atoms and len(runs) != 1:
        raise UsageError(f"the update kind needs exactly one --from run, got {len(runs)}",
                         hint="for several runs use --kind consensus")
    if "consensus" in atoms and len(runs) < 2:
        raise UsageError(f"the consensus kind needs at least two --from runs, got {len(runs)}",
                         hint="for one run use --kind update")
    if runs and not atoms & {"update", "consensus"}:
        raise UsageError("--from runs are only read by the update and consensus kinds")

    names = base.keys()
    computed = [n for n in names if selected(n, include, exclude) and is_matrix(base.info(n).dtype, base.info(n).shape)]
    others = [n for n in names if n not in set(computed)]
    if not computed:
        raise UsageError("no 2-D float tensor of the base is selected: there is nothing to compute a mask for",
                         hint="check --include/--exclude")
    if others and vectors is None:
        raise UsageError(f"{len(others)} tensor(s) get no computed mask (1-D, non-float or not selected), "
                         f"e.g. {others[0]}: say whether they train or stay frozen",
                         hint="add --vectors train or --vectors freeze")
    for run in runs:
        keys = set(run.keys())
        for n in computed:
            if n not in keys:
                raise TensorMismatchError(f"{run.ref} has no tensor {n!r}, which the base has",
                                          hint="--from runs must be fine-tunes of BASE (or --exclude the tensor)")
            if run.info(n).shape != base.info(n).shape:
                raise TensorMismatchError(f"{run.ref}: {n} has shape {run.info(n).shape}, the base "
                                          f"{base.info(n).shape}", hint="--from runs must be fine-tunes of BASE")

    fingerprints, tensors = {}, []
    computed_set = set(computed)
    for name in names:
        info = base.info(name)
        raw = base.get_array(name)
        fingerprints[name] = fingerprint(raw, info.dtype)
        p = parse_name(name)
        if name in computed_set:
            run_arrays = [(r.get_array(name), r.info(name).dtype) for r in runs]  # empty unless update/consensus
            mm = MatrixMasks(name, raw, info.dtype, spec, run_arrays)
            mask = expr.evaluate(mm)
            tensors.append(TensorMask(name, p.layer, p.module, info.shape, True, int(np.count_nonzero(mask)),
                                      mm.rank, np.packbits(mask.reshape(-1), bitorder="little")))
            del mm, mask, run_arrays
        else:
            trainable = vectors == Vectors.train
            bits = np.full((info.numel + 7) // 8, 0xFF if trainable else 0, np.uint8)
            if trainable and info.numel % 8:
                bits[-1] = (1 << (info.numel % 8)) - 1  # padding bits stay 0, as np.packbits leaves them
            tensors.append(TensorMask(name, p.layer, p.module, info.shape, False,
                                      info.numel if trainable else 0, None, bits))
        del raw
        if progress:
            progress(info.nbytes)
    return MaskBuild(_recipe(spec, expr, kind, base, runs, vectors), tuple(tensors), fingerprints)
