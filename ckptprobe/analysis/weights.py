"""What counts as a weight, and how a weight is read as float32 matrices.

Two extension points, used by every analysis through the planner (`analysis.plan`):

- `not_a_weight(source, name)` says why a tensor is not a weight (an integer or bool
  buffer such as BERT's `position_ids`), or None for a weight. Formats that store
  auxiliary tensors beside their weights (block scales) answer here.
- `read_matrix(source, name, index)` reads one weight matrix as float32 values, the
  `index`-th of a 3-D stack `(E, out, in)` of experts. Formats whose stored values are
  not the weight's values (block-scaled FP8) are dequantized here.

Comparisons of stored bits (sparsity, consensus) read storage arrays directly and do
not pass through `read_matrix`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptprobe.io._safetensors import FLOAT_DTYPES
from ckptprobe.io.names import is_scale, parse_name
from ckptprobe.io.sources import TensorSource

if TYPE_CHECKING:  # the readers import numpy when they run: the planner, which asks what a weight is, does not
    import numpy as np

# safetensors dtype -> the name users know (for "1 int64 buffer")
DTYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
               "I32": "int32", "U64": "uint64", "I64": "int64"}


def not_a_weight(source: TensorSource, name: str) -> str | None:
    """None for a weight (a floating-point tensor), else a short label of what it is ("int64 buffer")."""
    dtype = source.info(name).dtype
    if is_scale(name):  # FP8 block scales and the like: read with their weight, never analysed alone
        return "quantization scale"
    if dtype in FLOAT_DTYPES:
        return None
    return f"{DTYPE_NAMES.get(dtype, dtype)} buffer"


def is_expert_stack(name: str, shape: tuple[int, ...]) -> bool:
    """A 3-D `(E, out, in)` tensor of E experts' matrices (a fused MoE layer: `...experts.gate_up_proj`,
    GraniteMoE's `block_sparse_moe.input_linear`)."""
    return len(shape) == 3 and ("experts" in name.split(".") or parse_name(name).stacked)


def read_raw(source: TensorSource, name: str, index: int | None = None) -> np.ndarray:
    """A tensor in its storage dtype, shaped; with `index`, the `index`-th matrix of a 3-D stack `(E, out, in)`."""
    if index is None:
        return source.get_array(name)
    m, n = source.info(name).shape[1:]
    return source.read(name, index * m * n, (index + 1) * m * n).reshape(m, n)


def read_matrix(source: TensorSource, name: str, index: int | None = None) -> np.ndarray:
    """One weight matrix as float32 `(out, in)` values (as stored: GPT-2 Conv1D weights stay `(in, out)`).

    `index` picks the matrix of a 3-D expert stack `(E, out, in)`; None reads a 2-D tensor whole.
    FP8 weights with block scales are dequantized (`io.fp8`).
    """
    from ckptprobe.analysis.bf16 import to_float32
    from ckptprobe.io import fp8

    if fp8.block_scaled(source, name):
        return fp8.read_dequantized(source, name, index)
    return to_float32(read_raw(source, name, index), source.info(name).dtype)


def read_values(source: TensorSource, name: str, start: int = 0, stop: int | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """Elements [start, stop) of a flattened weight as float32 values (FP8 with block scales: dequantized);
    `out`: a uint8 buffer the raw bytes may be read into (`TensorSource.read`)."""
    from ckptprobe.analysis.bf16 import to_float32
    from ckptprobe.io import fp8

    if fp8.block_scaled(source, name):
        return fp8.read_dequantized_range(source, name, start, stop)
    return to_float32(source.read(name, start, stop, out), source.info(name).dtype)
