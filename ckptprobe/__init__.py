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
    "renamed": "ckptprobe.analysis.pairing",
    # what is analysed, and what is skipped
    "plan_tensors": "ckptprobe.analysis.plan",
    "Want": "ckptprobe.analysis.plan",
    "Skipped": "ckptprobe.analysis.plan",
    "SkipCategory": "ckptprobe.analysis.plan",
    "skip_summary": "ckptprobe.analysis.plan",
    # the update rule and the analyses, with their results
    "CompareMode": "ckptprobe.analysis.choices",
    "update_mask": "ckptprobe.analysis.update",
    "sparsity": "ckptprobe.analysis.sparsity",
    "SparsityResult": "ckptprobe.analysis.sparsity",
    "spectrum": "ckptprobe.analysis.spectrum",
    "SpectrumResult": "ckptprobe.analysis.spectrum",
    "TopkMethod": "ckptprobe.analysis.choices",
    "principal_overlap": "ckptprobe.analysis.principal",
    "PrincipalResult": "ckptprobe.analysis.principal",
    "consensus": "ckptprobe.analysis.consensus",
    "ConsensusResult": "ckptprobe.analysis.consensus_results",
    "profile": "ckptprobe.analysis.profile",
    "ProfileResult": "ckptprobe.analysis.profile",
    "drift": "ckptprobe.analysis.drift",
    "DriftResult": "ckptprobe.analysis.drift",
    "mask_overlap": "ckptprobe.analysis.overlap",
    # the same model in other coordinates
    "scramble_checkpoint": "ckptprobe.analysis.scramble",
    # masks for training
    "build_masks": "ckptprobe.analysis.masks",
    "MaskSpec": "ckptprobe.analysis.masks",
    "MaskBuild": "ckptprobe.analysis.masks",
    "Vectors": "ckptprobe.analysis.choices",
    "Kind": "ckptprobe.analysis.choices",
    "LowThreshold": "ckptprobe.analysis.choices",
    "principal_mask": "ckptprobe.analysis.mask_select",
    "low_mask": "ckptprobe.analysis.mask_select",
    "write_masks": "ckptprobe.io.maskfile",
    "load_masks": "ckptprobe.io.maskfile",
    "read_masks": "ckptprobe.io.maskfile",
    # errors: each also subclasses a builtin (FileNotFoundError, ValueError, ...)
    "CkptprobeError": "ckptprobe.errors",
    "UsageError": "ckptprobe.errors",
    "CheckpointNotFoundError": "ckptprobe.errors",
    "InvalidCheckpointError": "ckptprobe.errors",
    "TensorMismatchError": "ckptprobe.errors",
    "NoMatchingTensorsError": "ckptprobe.errors",
    "MaskFileError": "ckptprobe.errors",
    "HubError": "ckptprobe.errors",
    "DeviceError": "ckptprobe.errors",
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
