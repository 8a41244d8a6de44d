"""ckptprobe: weight-space diagnostics for LLM post-training checkpoints.

The public API, listed explicitly. Names are imported on first use (PEP 562), so
`import ckptprobe` and the CLI stay fast: torch, matplotlib and huggingface_hub are
loaded only by what needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # where tensors come from
    "open_source": "ckptprobe.io.sources",
    "TensorInfo": "ckptprobe.io._safetensors",
    "parse_name": "ckptprobe.io.names",
    # the update rule and the analyses
    "CompareMode": "ckptprobe.analysis.update",
    "update_mask": "ckptprobe.analysis.update",
    "sparsity": "ckptprobe.analysis.sparsity",
    "spectrum": "ckptprobe.analysis.spectrum",
    "principal_overlap": "ckptprobe.analysis.principal",
    "consensus": "ckptprobe.analysis.consensus",
    "profile": "ckptprobe.analysis.profile",
    "drift": "ckptprobe.analysis.drift",
    # masks for training
    "build_masks": "ckptprobe.analysis.masks",
    "principal_mask": "ckptprobe.analysis.mask_select",
    "low_mask": "ckptprobe.analysis.mask_select",
    "load_masks": "ckptprobe.io.maskfile",
    "read_masks": "ckptprobe.io.maskfile",
    # errors
    "CkptprobeError": "ckptprobe.errors",
}
__all__ = sorted(_API) + ["examples", "train"]


def __getattr__(name: str):
    if name in ("examples", "train"):
        return importlib.import_module(f"ckptprobe.{name}")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ckptprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
