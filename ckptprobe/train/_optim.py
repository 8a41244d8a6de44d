"""Masked optimizers: any torch optimizer class, made to keep a mask file's frozen entries fixed.

`masked(torch.optim.AdamW)` is a subclass of AdamW whose constructor also takes `masks=`
(a mask file path: something a config file can carry). It constrains the tensors it
steps itself, whatever they are: a model's parameters, fp32 master copies of a bf16
model, or FSDP2's DTensor shards. Because it is an ordinary class reachable by dotted
path (`ckptprobe.train.MaskedAdamW`), trainers that import their optimizer by name and
pass keyword overrides (verl's `optim.optimizer_impl` / `optim.optimizer` /
`optim.override_optimizer_config`) use it without code changes.
"""

from __future__ import annotations

import torch

from ckptprobe.train._masked import MaskedUpdates, constrain

_DOC = """{base} that trains only the entries a mask allows and keeps the rest bitwise fixed.

Takes {base}'s arguments plus:
    masks: a mask file path (`ckptprobe masks BASE --kind safe -o FILE`), a `MaskSet` or
        {{name: bool tensor}}; True = trained.
    missing: a parameter no mask covers: "error" (default), "freeze" or "train".
    check_base: compare parameters with the base fingerprints in the mask file (default True).

Masks are placed by name when the parameters come named (`model.named_parameters()`,
torch >= 2.6), else by content: each parameter (or 3-D slice) is matched with the base
tensor whose fingerprint it has, so the parameters must hold the base weights when the
optimizer is built (as they do when a trainer builds it right after loading the base).
`self.masked_updates` holds the hooks and the saved frozen values (`.nbytes`).
"""


def masked(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """The subclass `Masked<cls.__name__>` of optimizer class `cls` that takes `masks=` (see its docstring)."""

    def __init__(self, params, *args, masks, missing: str = "error", check_base: bool = True, **kwargs):
        cls.__init__(self, params, *args, **kwargs)
        tensors, names, seen = [], [], set()
        for group in self.param_groups:
            group_names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                if id(p) not in seen:
                    seen.add(id(p))
                    tensors.append(p)
                    names.append([group_names[j]] if group_names else [])
        self.masked_updates: MaskedUpdates = constrain(self, tensors, names, masks, missing=missing,
                                                       check_base=check_base)

    name = f"Masked{cls.__name__}"
    return type(name, (cls,), {"__init__": __init__, "__doc__": _DOC.format(base=cls.__name__),
                               "__module__": __name__, "__qualname__": name})


MaskedAdamW = masked(torch.optim.AdamW)
MaskedAdam = masked(torch.optim.Adam)
MaskedSGD = masked(torch.optim.SGD)
for _cls in (MaskedAdamW, MaskedAdam, MaskedSGD):
    _cls.__module__ = "ckptprobe.train"  # the dotted path trainers import it by
