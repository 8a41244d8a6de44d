"""Mask-constrained updates: train only the entries a mask allows, keep the rest bitwise fixed.

"The Path Not Taken" (Sec. 5.1) runs RL with a one-shot mask computed from the base
model: only masked entries are updated. Zeroing their gradients is not enough, because
decoupled weight decay (AdamW) moves every weight, gradient or not, and momentum carries
old gradients. So we do both: gradients outside the mask are zeroed as they are
accumulated (gradient clipping sees only the trained entries and Adam's moments stay
exactly zero there; FSDP2 assigns its sharded gradients instead, so those are zeroed just
before each step), and after every `optimizer.step()` the frozen entries are written back
from a copy taken once.
The result is bitwise, for any torch optimizer, on whatever tensors the optimizer steps:
fp32 master weights, bf16 parameters, or FSDP2's DTensor shards.

Two ways in, one mechanism: `mask_updates(model, masks, optimizer)` hooks an existing
optimizer over a model's parameters; `masked(torch.optim.AdamW)(params, masks=...)` is an
optimizer class that constrains the tensors it steps itself (see `_optim`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ckptprobe.errors import MaskFileError, UsageError
from ckptprobe.io.maskfile import MaskSet
from ckptprobe.train._frozen import Frozen
from ckptprobe.train._resolve import MaskSource, is_dtensor, local, local_keep, resolve, tensor_fingerprint

MISSING = ("error", "freeze", "train")


@dataclass
class MaskedUpdates:
    """What is installed on an optimizer; `remove()` takes it all out and frees the saved values.

    `frozen` maps each constrained parameter to its `Frozen` entries on this process, by its
    first name; without names, by the mask that landed on it (`param[i] shape` when none did), with `(param[i])`
    after a name that an earlier parameter has (bitwise-equal base tensors).
    """

    frozen: dict[str, Frozen]
    _handles: list = field(default_factory=list, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory held: packed positions plus saved frozen values."""
        return sum(f.nbytes for f in self.frozen.values())

    def remove(self) -> None:
        """Remove every hook; training is unconstrained from here on."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.frozen.clear()


def constrain(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], names: Sequence[Sequence[str]],
              masks, *, missing: str = "error", check_base: bool = True) -> MaskedUpdates:
    """Keep the frozen entries of `params` (all stepped by `optimizer`) bitwise fixed across its steps.

    names: each parameter's names (tied: several; unknown: empty, then masks are matched by content).
    masks: a mask file path, a `MaskSet`, or {name: bool tensor}, in checkpoint coordinates.
    Everything is checked before any hook is installed: a call that raises installs nothing.
    """
    _check_missing(missing)
    source = MaskSource(masks)
    return _install(optimizer, params, names, source, resolve(params, names, source, check_base), missing)


def _check_missing(missing: str) -> None:
    if missing not in MISSING:
        raise UsageError(f"missing={missing!r}: expected 'error', 'freeze' or 'train'")


def _install(optimizer, params, names, source: MaskSource, pieces, missing: str) -> MaskedUpdates:
    plan = []  # (label, param, keep mask of the local part or None = all frozen)
    labels = set()
    for i, (p, ns, pcs) in enumerate(zip(params, names, pieces, strict=True)):
        label = ns[0] if ns else f"param[{i}] {tuple(p.shape)}" if not pcs else \
            pcs[0].name + (f" (+{len(pcs) - 1} more)" if len(pcs) > 1 else "")
        if label in labels:  # bare parameters: bitwise-equal base tensors (norms) land on one mask name
            label += f" (param[{i}])"
        labels.add(label)
        if not pcs:
            if missing == "error":
                raise MaskFileError(f"no mask for {label}, which the optimizer trains",
                                    hint="pass missing='freeze' to keep it fixed or missing='train' to train it fully")
            if missing == "freeze":
                plan.append((label, p, None))
            continue
        keep = local_keep(p, pcs, source)
        if not keep.all():  # an all-True mask needs nothing
            plan.append((label, p, keep if keep.any() else None))

    handle = MaskedUpdates({})
    entries, assigned = [], []  # assigned: gradients set, not accumulated (FSDP2's sharded ones)
    for label, p, keep in plan:
        frozen = Frozen(label, local(p), keep)
        handle.frozen[label] = frozen
        entries.append((p, frozen))
        if is_dtensor(p):
            assigned.append((p, frozen))
        elif p.requires_grad:
            handle._handles.append(p.register_post_accumulate_grad_hook(_zero_when_accumulated(frozen)))
    if not entries:
        return handle
    stepped = _stepped(optimizer)

    def before_step(opt, args, kwargs) -> None:
        now = _stepped(opt)
        if len(now) != len(stepped) or any(a is not b for a, b in zip(now, stepped)):
            raise UsageError("the optimizer steps other tensors than when the masks were applied (DeepSpeed ZeRO "
                             "swaps in flat fp32 partitions; add_param_group adds tensors): frozen entries "
                             "would not stay fixed", hint="apply the masks after the optimizer is complete; "
                             "DeepSpeed ZeRO is not supported")
        for p, frozen in entries:
            frozen.check(local(p))
        for p, frozen in assigned:
            if p.grad is not None:
                frozen.zero(local(p.grad))

    def after_step(opt, args, kwargs) -> None:
        for p, frozen in entries:
            frozen.restore(local(p))

    handle._handles += [optimizer.register_step_pre_hook(before_step), optimizer.register_step_post_hook(after_step)]
    return handle


def _stepped(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _zero_when_accumulated(frozen: Frozen):
    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            frozen.zero(p.grad)
    return hook


def mask_updates(model: torch.nn.Module, masks, optimizer: torch.optim.Optimizer, *, missing: str = "error",
                 check_base: bool = True) -> MaskedUpdates:
    """Constrain `optimizer` to update only the entries of `model` where `masks` is True.

    model: the module whose parameters `optimizer` steps (register after moving it to its device).
    masks: a mask file path, a `MaskSet` from `load_masks`, or {name: bool tensor}; True = trained.
        Mask files keep checkpoint coordinates: they are mapped onto the model's parameters by
        name (identical, or one constant prefix apart), tied parameters by any of their names,
        and, using the base fingerprints, by content (renamed modules; transformers' fused 3-D
        expert parameters, one expert matrix or gate/up half per slice).
    optimizer: any torch optimizer over (a subset of) `model.parameters()`.
    missing: a parameter the optimizer steps but no mask covers: "error" (default), "freeze"
        (keep it whole) or "train" (leave it unconstrained).
    check_base: compare each parameter with the fingerprint of the base tensor its mask was
        computed on (cast to the base's stored dtype: a bf16 base loaded as fp32 matches).
        Pass False to resume a run whose trained entries have already moved; masks are then
        placed by name only.

    Frozen entries stay bitwise equal to their values at this call, after any number of
    steps (AdamW's weight decay and momentum included). Memory: see `Frozen`.

    Refused (errors name the tensor): masks that land on no parameter (MaskFileError), a mask
    whose shape or base fingerprint differs from its parameter (TensorMismatchError), a mask
    on a trainable parameter this optimizer does not step, and an optimizer stepping tensors
    that are not the model's parameters (UsageError): fp32 master copies are constrained by
    building the optimizer with `ckptprobe.train.masked(...)` over the masters instead.
    """
    params, names = _named(model)
    stepped = {id(p) for p in _stepped(optimizer)}
    if stepped - {id(p) for p in params}:
        raise UsageError("the optimizer steps tensors that are not parameters of the model (fp32 master "
                         "copies?): frozen entries could not be kept fixed",
                         hint="build the optimizer with ckptprobe.train.masked(...) over the tensors it steps")
    _check_missing(missing)
    source = MaskSource(masks)
    pieces = resolve(params, names, source, check_base)
    for p, ns, pcs in zip(params, names, pieces, strict=True):
        if pcs and id(p) not in stepped and p.requires_grad:
            raise UsageError(f"{ns[0]} has a mask but the optimizer does not step it, so the mask would not be "
                             "enforced", hint="pass the optimizer that updates it")
    keep = [i for i, p in enumerate(params) if id(p) in stepped]
    return _install(optimizer, [params[i] for i in keep], [names[i] for i in keep], source,
                    [pieces[i] for i in keep], missing)


def _named(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[list[str]]]:
    """The model's distinct parameters and each one's names (a tied parameter has several)."""
    params, names, index = [], [], {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in index:
            index[id(p)] = len(params)
            params.append(p)
            names.append([])
        names[index[id(p)]].append(name)
    return params, names


def model_masks(masks, model: torch.nn.Module) -> MaskSet:
    """`masks` (checkpoint coordinates) in the coordinates of `model`: {parameter name: bool tensor shaped like
    the parameter}, placed as `mask_updates` places them, with fingerprints of the parameters as they are now.

    `model` must hold the base weights (content placement needs them). Its use is resuming: once trained
    entries have moved, `check_base=False` places masks by name only, and a checkpoint's names are not a
    model's when transformers renames (vision-language models) or fuses (MoE experts) them on loading. Save
    the result (`.save(path)`, a mask file) at the start of a run and resume with that file and
    `check_base=False`; or, at resume, compute it again on the base model."""
    params, names = _named(model)
    sharded = next((ns[0] for p, ns in zip(params, names) if is_dtensor(p)), None)
    if sharded is not None:  # before resolving: that would gather every parameter first
        raise UsageError(f"{sharded} is sharded (a DTensor): compute the model's masks before fully_shard")
    source = MaskSource(masks)
    out = MaskSet()
    out.recipe, out.fingerprints = {**source.recipe, "coordinates": "model"}, {}
    for p, ns, pcs in zip(params, names, resolve(params, names, source), strict=True):
        if not pcs:
            continue
        out[ns[0]] = torch.from_numpy(local_keep(p, pcs, source))
        fp = source.fingerprints.get(pcs[0].name)
        if fp is not None:
            out.fingerprints[ns[0]] = tensor_fingerprint(p, fp.split(":")[0])
    return out
