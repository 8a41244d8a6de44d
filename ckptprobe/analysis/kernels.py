"""The compiled loops of the bitwise comparison (`_kernels.c`), or None.

The package builds them where a C compiler is at hand; without one it installs all the
same and `update.count_changes`, `update.update_mask` and `mask_scan` compute the same
results in numpy passes.
Every caller reads `kernels.compiled` at call time, so setting it to None selects the
numpy path (the tests run every path). The loops that read local files themselves
(`count16_files`, `mark16_files`; `norms_files`, drift's sums) use `pread` and are left out
where it is missing (Windows): callers look them up with getattr, and read in Python without them.
A module from an older build (an editable install whose C source changed since) has
another VERSION and is not used: rebuild with `pip install -e .`.
"""

from ckptprobe.analysis.choices import CompareMode

VERSION = 5  # of the loops' signatures and meaning, as `_kernels.c` states it

try:
    from ckptprobe.analysis import _kernels as compiled
except ImportError:  # built without a C compiler
    compiled = None
if getattr(compiled, "VERSION", None) != VERSION:
    compiled = None

# Bits of the exponent field of the 16-bit floats: all ones means inf or NaN.
EXPONENT16 = {"BF16": 0x7F80, "F16": 0x7C00}


def one_pass(dtype_a: str, dtype_b: str, mode: CompareMode) -> bool:
    """Whether a pair is counted in one compiled pass (`count16`): bitwise, one 16-bit float dtype."""
    return compiled is not None and mode == CompareMode.bitwise and dtype_a == dtype_b in EXPONENT16
