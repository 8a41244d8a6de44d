"""Mask-constrained updates: train only the entries a mask allows, keep the rest bitwise fixed.

"The Path Not Taken" (Sec. 5.1) runs RL with a one-shot mask computed from the base
model: only masked entries are updated. Zeroing their gradients is not enough, because
decoupled weight decay (AdamW) moves every weight, gradient or not, and momentum carries
old gradients. So we do both: gradients outside the mask are zeroed as they are
accumulated (Adam's moments stay exactly zero there, and gradient clipping sees only the
trained entries), and after every `optimizer.step()` the frozen entries are written back
from a copy taken once. The result is bitwise, for any torch optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ckptprobe.errors import MaskFileError, TensorMismatchError, UsageError
from ckptprobe.io.maskfile import fingerprint

# Entries per chunk when writing frozen values back. On CUDA, `masked_scatter_` allocates an
# int64 prefix sum the size of its input (8 bytes per entry: 4.8 GB for a 150k x 4k lm_head);
# chunking bounds that scratch to 128 MiB.
_CHUNK = 1 << 24

_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclass
class MaskedUpdates:
    """What `mask_updates` installed; `remove()` takes it all out and frees the copies.

    `frozen` maps each constrained parameter name to `(mask, values)`: `mask` is the bool
    mask (True = trained, shaped like the parameter, the caller's tensor when it already
    sat on the parameter's device), or None when the whole parameter is frozen; `values`
    is 1-D, in the parameter's dtype: the frozen entries in row-major order.
    """

    frozen: dict[str, tuple[torch.Tensor | None, torch.Tensor]]
    _handles: list = field(default_factory=list, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory held: the bool masks plus the frozen values."""
        return sum((0 if m is None else m.numel() * m.element_size()) + v.numel() * v.element_size()
                   for m, v in self.frozen.values())

    def remove(self) -> None:
        """Remove every hook; training is unconstrained from here on."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.frozen.clear()


def _param_fingerprint(p: torch.Tensor, dtype: str) -> str:
    """The `maskfile.fingerprint` of `p` stored as `dtype` (BF16 hashed as its uint16 bits)."""
    if dtype not in _TORCH_DTYPES:
        raise MaskFileError(f"cannot check a base fingerprint of dtype {dtype}")
    t = p.detach().to(_TORCH_DTYPES[dtype]).cpu().contiguous()
    raw = t.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else t.numpy()
    return fingerprint(raw, dtype)


def _check(name: str, p: torch.Tensor, mask: torch.Tensor, fp: str | None) -> None:
    if mask.dtype != torch.bool:
        raise MaskFileError(f"mask for {name!r} is {mask.dtype}, expected torch.bool")
    if mask.shape != p.shape:
        raise TensorMismatchError(f"{name}: mask shape {tuple(mask.shape)} != parameter shape {tuple(p.shape)}")
    # Cast to the dtype the base was stored in: an fp32 copy of a bf16 base hashes equal.
    if fp is not None and _param_fingerprint(p, fp.split(":")[0]) != fp:
        raise TensorMismatchError(
            f"{name}: the parameter differs from the base tensor the mask was computed on",
            hint="apply the mask to the model it was computed from; to skip this check on purpose "
                 "(e.g. resuming), pass dict(masks), which carries no fingerprints")


def _chunks(t: torch.Tensor):
    """Row slices of `t` (a 0-d tensor as one entry) of about `_CHUNK` entries each."""
    t = t.view(1) if t.dim() == 0 else t
    rows = max(1, _CHUNK * t.shape[0] // max(1, t.numel()))
    return [t[s:s + rows] for s in range(0, t.shape[0], rows)]


def _zero_frozen_grad(keep: torch.Tensor | None):
    def hook(p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if keep is None:
            p.grad.zero_()
        else:  # in place, no temporary; a NaN in a frozen entry becomes 0 too
            torch.where(keep, p.grad, p.grad.new_zeros(()), out=p.grad)
    return hook


def mask_updates(model: torch.nn.Module, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                 *, missing: str = "error") -> MaskedUpdates:
    """Constrain `optimizer` to update only the entries where `masks` is True.

    model: the module whose parameters `optimizer` steps (register after moving it to its device).
    masks: {parameter name: bool tensor shaped like it}, True = trained, False = frozen; a
        `MaskSet` from `load_masks` also carries base fingerprints, checked here.
    optimizer: any torch optimizer over (a subset of) `model.parameters()`.
    missing: what to do with a parameter the optimizer steps but `masks` does not name:
        "error" (default), "freeze" (keep it whole) or "train" (leave it unconstrained).

    Two hooks per constrained parameter: a post-accumulate-grad hook zeroes the frozen
    entries of its gradient, and one optimizer step-post hook writes the frozen entries back
    after each `optimizer.step()`, so they stay bitwise equal to their values at this call
    (AdamW's weight decay and momentum included). Run other step-post hooks that read the
    weights (EMA) after this one: register them later.

    Memory, per constrained parameter of n entries with a fraction f frozen: a bool mask
    (n bytes) plus the frozen values in the parameter's own dtype (f * n * itemsize bytes):
    1 + 2f bytes per entry for bf16, nothing in fp32. The mask is the caller's tensor when
    it is already on the parameter's device (load the masks there: no second copy). A
    wholly frozen parameter (`missing="freeze"` or an all-False mask) keeps no mask
    (itemsize bytes per entry); an all-True mask costs nothing. Setup needs one more copy
    of the frozen values transiently; each restore works in chunks of 2^24 entries.
    Do not modify the masks in place while the hooks are installed.

    Refused (errors name the parameter): masks for names the model lacks (MaskFileError),
    a mask whose shape or base fingerprint differs from its parameter (TensorMismatchError),
    a mask on a trainable parameter this optimizer does not step, and an optimizer holding
    tensors that are not the model's parameters (UsageError): with fp32 master copies of
    bf16 weights the optimizer's tensors are the masters, which this hook cannot see.
    Sharded wrappers (FSDP, DeepSpeed ZeRO) rename and flatten parameters: not supported.
    """
    if missing not in ("error", "freeze", "train"):
        raise UsageError(f"missing={missing!r}: expected 'error', 'freeze' or 'train'")
    params: dict[int, torch.Tensor] = {}
    names: dict[int, list[str]] = {}  # tied weights have several names
    for name, p in model.named_parameters(remove_duplicate=False):
        params[id(p)] = p
        names.setdefault(id(p), []).append(name)
    unknown = sorted(set(masks) - {n for ns in names.values() for n in ns})
    if unknown:
        raise MaskFileError(f"the masks name {len(unknown)} parameter(s) the model does not have, "
                            f"e.g. {unknown[0]!r}", hint="check that the mask file was made for this model")
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if stepped - params.keys():
        raise UsageError("the optimizer steps tensors that are not parameters of the model "
                         "(fp32 master copies?): frozen entries could not be kept fixed",
                         hint="build the optimizer over model.parameters(), or pass the module that owns "
                              "the tensors the optimizer steps")
    fps = getattr(masks, "fingerprints", None) or {}

    plan = []  # (name, param, keep mask or None = all frozen); everything checked before any hook
    for pid, p in params.items():
        named = [n for n in names[pid] if n in masks]
        for n in named:
            _check(n, p, masks[n], fps.get(n))
        if any(not torch.equal(masks[n], masks[named[0]]) for n in named[1:]):
            raise TensorMismatchError(f"{named[0]} and {named[1]} are the same (tied) tensor but have different masks")
        if pid not in stepped:
            if named and p.requires_grad:
                raise UsageError(f"{named[0]} has a mask but the optimizer does not step it, so the mask "
                                 "would not be enforced", hint="pass the optimizer that updates it")
        elif not named:
            if missing == "error":
                raise MaskFileError(f"no mask for {names[pid][0]}, which the optimizer trains",
                                    hint="pass missing='freeze' to keep it fixed or missing='train' to train it fully")
            if missing == "freeze":
                plan.append((names[pid][0], p, None))
        else:
            keep = masks[named[0]].to(p.device)  # the caller's tensor when already there: no copy
            if not bool(keep.all()):  # an all-True mask needs nothing
                plan.append((named[0], p, keep if bool(keep.any()) else None))

    handle = MaskedUpdates({})
    entries = []  # (param, keep mask or None, frozen values split per chunk)
    for name, p, keep in plan:
        with torch.no_grad():
            if keep is None:
                values = p.detach().reshape(-1).clone()
                pieces = [values]
            else:
                parts = [pc[~kc] for pc, kc in zip(_chunks(p.detach()), _chunks(keep), strict=True)]
                values = torch.cat(parts)
                pieces = values.split([len(part) for part in parts])  # views into values, no copy
                del parts
        handle.frozen[name] = (keep, values)
        entries.append((p, keep, pieces))
        if p.requires_grad:
            handle._handles.append(p.register_post_accumulate_grad_hook(_zero_frozen_grad(keep)))

    @torch.no_grad()
    def restore(opt, args, kwargs) -> None:
        for p, keep, pieces in entries:
            if keep is None:
                p.copy_(pieces[0].view_as(p))
            else:
                for pc, kc, vc in zip(_chunks(p), _chunks(keep), pieces, strict=True):
                    pc.masked_scatter_(~kc, vc)

    if entries:
        handle._handles.append(optimizer.register_step_post_hook(restore))
    return handle
