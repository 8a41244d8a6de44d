"""The named choices and defaults the analyses take, in a module that imports nothing heavy.

They are the vocabulary shared by the API and the command line. The analyses import them
from here, and so does `cli/_options`, which builds every option from them without loading
numpy: a help screen or a usage error costs no array library.
"""

from __future__ import annotations

from enum import Enum

DEFAULT_ETA = 1e-3  # the relative update rule's eta ("The Path Not Taken", Def. 2.1)
DEFAULT_ATOL = 1e-5  # the fixed tolerance of earlier work
DEFAULT_ALPHA = 0.05  # the fraction of a matrix a principal or low-magnitude mask keeps


class CompareMode(str, Enum):
    """How "changed" is decided: see `analysis/update.py`."""

    bitwise = "bitwise"
    bf16 = "bf16"
    eta = "eta"
    atol = "atol"


def default_mode(dtype_a: str, dtype_b: str) -> CompareMode:
    """Bitwise where both sides share a dtype; else both rounded to bf16."""
    return CompareMode.bitwise if dtype_a == dtype_b else CompareMode.bf16


def same_rule(dtype_a: str, dtype_b: str, mode: CompareMode, eta: float) -> CompareMode:
    """The cheapest mode that decides every pair of these dtypes as `mode` does: bitwise for two bf16 sides
    in bf16 mode (rounding bf16 to bf16 changes nothing) or in eta mode with eta < 2^-8 (two distinct bf16
    values differ by at least 2^-8 of the larger magnitude, so the rule holds exactly where the bits are
    equal, +0 and -0 included: docs/sparsity.md); else `mode` itself."""
    if dtype_a == dtype_b == "BF16" and (mode == CompareMode.bf16 or (mode == CompareMode.eta and eta < 2.0 ** -8)):
        return CompareMode.bitwise
    return mode


class Kind(str, Enum):
    """Mask kinds: see `analysis/mask_expr.py`."""

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


class TopkMethod(str, Enum):
    """How top-k singular triplets are computed: see `analysis/svd.py`."""

    auto = "auto"  # randomized for matrices with a side >= svd.RANDOMIZED_MIN_SIDE (but see svd.QR_FIRST_RATIO)
    exact = "exact"
    randomized = "randomized"


class Target(str, Enum):
    """The trainers' coarse formats a mask file is exported to: see `analysis/coarse.py`."""

    axolotl = "axolotl"
    spectrum = "spectrum"
    peft = "peft"
