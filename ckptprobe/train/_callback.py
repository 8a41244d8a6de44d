"""A transformers `TrainerCallback` that keeps training inside a mask file (Trainer, TRL's GRPOTrainer, ...).

At train begin it places the file's masks on the model the trainer holds (checking each
against its base fingerprint) and hooks the trainer's optimizer, as `mask_updates` does;
at train end it takes the hooks out. Gradient clipping then sees only the trained entries,
and frozen entries stay bitwise equal to the base.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from ckptprobe.errors import UsageError
from ckptprobe.train._masked import MaskedUpdates, mask_updates


class MaskCallback(TrainerCallback):
    """Train only the entries of `masks` (a mask file path) that are True.

        trainer = GRPOTrainer(..., callbacks=[MaskCallback("safe.safetensors")])

    missing / check_base: as in `mask_updates` (`check_base=False` when resuming a masked run:
    the trained entries have moved from the base by then). `self.handle` is the installed
    `MaskedUpdates` during training (its `nbytes` is the memory held).
    Not supported: DeepSpeed ZeRO (the optimizer steps flat fp32 partitions, refused at train
    begin) and FSDP1 (flattened parameters, refused: no mask lands on them); under FSDP2 build
    the optimizer with `ckptprobe.train.MaskedAdamW` instead.
    """

    def __init__(self, masks: str | os.PathLike, *, missing: str = "error", check_base: bool = True):
        self.masks, self.missing, self.check_base = masks, missing, check_base
        self.handle: MaskedUpdates | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise UsageError("MaskCallback needs the trainer's model and optimizer at train begin")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.handle = mask_updates(model, self.masks, inner, missing=self.missing, check_base=self.check_base)

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
