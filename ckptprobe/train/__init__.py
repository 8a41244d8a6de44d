"""Training hooks: mask-constrained updates, dynamic gradient gating, soft conflict projection.

Plain functions, one small class and optimizer classes that hook into an ordinary torch
training loop (or a trainer: TRL, transformers, verl, FSDP2) and can be removed again;
nothing to inherit from. Importing this package imports torch; `MaskCallback` imports
transformers when first used.
"""

from ckptprobe.train._gate import GateStep, GradientGate
from ckptprobe.train._masked import MaskedUpdates, mask_updates, model_masks
from ckptprobe.train._optim import MaskedAdam, MaskedAdamW, MaskedSGD, masked
from ckptprobe.train._pcr import apply_pcr, gradient_conflict, gradient_variance, pcr_combine

__all__ = [
    "GateStep",
    "GradientGate",
    "MaskCallback",
    "MaskedAdam",
    "MaskedAdamW",
    "MaskedSGD",
    "MaskedUpdates",
    "apply_pcr",
    "gradient_conflict",
    "gradient_variance",
    "mask_updates",
    "masked",
    "model_masks",
    "pcr_combine",
]


def __getattr__(name: str):
    if name == "MaskCallback":  # imports transformers
        from ckptprobe.train._callback import MaskCallback

        return MaskCallback
    raise AttributeError(f"module 'ckptprobe.train' has no attribute {name!r}")
