"""Training hooks: mask-constrained updates, dynamic gradient gating, soft conflict projection.

Plain functions and one small class that hook into an ordinary torch training loop and can
be removed again; nothing to inherit from. Importing this package imports torch.
"""

from ckptprobe.train._gate import GateStep, GradientGate
from ckptprobe.train._masked import MaskedUpdates, mask_updates
from ckptprobe.train._pcr import apply_pcr, gradient_conflict, gradient_variance, pcr_combine

__all__ = [
    "GateStep",
    "GradientGate",
    "MaskedUpdates",
    "apply_pcr",
    "gradient_conflict",
    "gradient_variance",
    "mask_updates",
    "pcr_combine",
]
