"""Where each mask of a mask file lands in the parameters a trainer steps.

Mask files keep checkpoint coordinates: tensor names and shapes as stored, with a
fingerprint of each base tensor. The model a trainer holds may name and shape them
otherwise, so each parameter gets a list of `Piece`s (a mask and the box of the
parameter it covers), found in this order:

1. by name: identical names, or names that differ by one constant prefix for all
   (`model.layers.0...` in the checkpoint, `layers.0...` in a bare model); tied
   parameters answer to each of their names;
2. by content, for parameters still without a mask when the file has fingerprints:
   a parameter whose bits equal a base tensor (renamed modules), or a 3-D parameter
   whose slices along dim 0 are base tensors, or the two halves of each slice along
   dim 1 are (transformers >= 5 fuses per-expert matrices that way: `gate_up_proj[e]`
   is expert e's gate_proj stacked on its up_proj). Content is compared, never order
   assumed, so a half that is not where a mask expects it is simply not found.

Every mask must land somewhere and every piece must match its base tensor's
fingerprint (unless checking is switched off): what cannot be placed is refused, named.
Under FSDP2 a parameter is a DTensor; its fingerprint is computed on the gathered tensor
(a collective: every rank resolves the same parameters in the same order), and
`local_keep` cuts each mask to the rank's own shard.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ckptprobe.errors import MaskFileError, TensorMismatchError
from ckptprobe.io._safetensors import FLOAT_DTYPES
from ckptprobe.io.maskfile import fingerprint, read_masks

_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard (a view: writes reach the parameter)."""
    return t.to_local() if is_dtensor(t) else t


def tensor_fingerprint(t: torch.Tensor, dtype: str) -> str:
    """The `maskfile.fingerprint` of `t` stored as `dtype` (BF16 hashed as its uint16 bits)."""
    if dtype not in _TORCH_DTYPES:
        raise MaskFileError(f"cannot check a base fingerprint of dtype {dtype}")
    c = t.detach().to(_TORCH_DTYPES[dtype]).cpu().contiguous()
    raw = c.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else c.numpy()
    return fingerprint(raw, dtype)


class MaskSource:
    """Masks in checkpoint coordinates: a mask file path, a `MaskSet`, or {name: bool tensor or array}.

    `shapes` {name: shape}, `fingerprints` {name: "DTYPE:hash"} (empty for a plain dict), `recipe` (the
    file's, a `MaskSet`'s, or empty), and `array(name)` -> bool numpy array, read when needed.
    """

    def __init__(self, masks):
        if isinstance(masks, (str, os.PathLike)):
            mf = read_masks(masks)
            self.label, self.recipe = str(masks), mf.recipe
            fps = {n: e["fingerprint"] for n, e in mf.tensors.items() if e.get("fingerprint")}
            # A mask over an integer or bool base tensor (a buffer such as BERT's position_ids) masks
            # nothing an optimizer steps: such entries are not weights and are left out.
            self.shapes = {n: mf.shape(n) for n in mf.keys() 
                           if n not in fps or fps[n].split(":")[0] in FLOAT_DTYPES}
            self.fingerprints = {n: fp for n, fp in fps.items() if n in self.shapes}
            self._read = mf.mask
            return
        if not isinstance(masks, Mapping):
            raise MaskFileError(f"masks must be a mask file path or {{name: bool tensor}}, got {type(masks).__name__}")
        for name, m in masks.items():
            if m.dtype not in (torch.bool, np.bool_):
                raise MaskFileError(f"mask for {name!r} is {m.dtype}, expected bool")
        self.label, self.recipe = "the masks", dict(getattr(masks, "recipe", None) or {})
        self.shapes = {n: tuple(m.shape) for n, m in masks.items()}
        self.fingerprints = dict(getattr(masks, "fingerprints", None) or {})
        self._masks = masks
        self._read = None

    def array(self, name: str) -> np.ndarray:
        if self._read is not None:
            return self._read(name)
        m = self._masks[name]
        return m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)


@dataclass(frozen=True)
class Piece:
    """Mask `name` covers the box `[start, stop)` per dimension of the parameter (its full, unsharded shape)."""

    name: str
    box: tuple[tuple[int, int], ...]


def _whole(shape) -> tuple[tuple[int, int], ...]:
    return tuple((0, d) for d in shape)


def _prefix_rule(mask_names: set[str], param_names: set[str]):
    """The constant prefix change (strip, add) mapping most mask names onto parameter names."""
    unmatched = sorted(mask_names - param_names)
    if not unmatched:
        return "", ""
    m = unmatched[0]
    candidates = {("", "")}
    for n in param_names:
        if m.endswith("." + n):
            candidates.add((m[:len(m) - len(n)], ""))
        elif n.endswith("." + m):
            candidates.add(("", n[:len(n) - len(m)]))

    def score(rule):
        return sum(_apply(rule, x) in param_names for x in mask_names)

    return max(sorted(candidates), key=score)


def _apply(rule, name: str) -> str | None:
    """`name` with the prefix changed; None when it lacks the prefix (a constant prefix is on every name)."""
    strip, add = rule
    return add + name[len(strip):] if name.startswith(strip) else None


class _Full:
    """Fingerprints of boxes of the full (gathered) parameters, cached; the last parameter gathered is kept."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params, self._fps, self._last = params, {}, (None, None)

    def fingerprint(self, i: int, box, dtype: str) -> str:
        key = (i, box, dtype)
        if key not in self._fps:
            if self._last[0] != i:
                t = self.params[i].detach()
                self._last = (i, t.full_tensor() if is_dtensor(t) else t)
            self._fps[key] = tensor_fingerprint(self._last[1][tuple(slice(a, b) for a, b in box)], dtype)
        return self._fps[key]


def _content_boxes(shape) -> list[list[tuple[tuple, tuple[int, ...]]]]:
    """Ways to cut a parameter into base tensors, as [(box, stored shape)]: whole; for 3-D, each
    slice along dim 0, or the two halves on dim 1 of each slice (gate, up)."""
    ways = [[(_whole(shape), tuple(shape))]]
    if len(shape) == 3:
        E, a, b = shape
        ways.append([(((e, e + 1), (0, a), (0, b)), (a, b)) for e in range(E)])
        if a % 2 == 0:
            h = a // 2
            ways.append([(((e, e + 1), (s, s + h), (0, b)), (h, b)) for e in range(E) for s in (0, h)])
    return ways


def _box_shape(box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def resolve(params: Sequence[torch.Tensor], names: Sequence[Sequence[str]], source: MaskSource,
            check: bool = True) -> list[list[Piece]]:
    """The pieces of each parameter (an empty list: no mask names it); see the module docstring.

    params: the tensors stepped (plain or DTensor), distinct; names: each one's names (empty when unknown).
    check: compare each piece with its base tensor's fingerprint (when the masks carry them); without
        it (resuming: trained entries have moved) masks are placed by name only.
    """
    full = _Full(params)
    pieces: list[list[Piece]] = [[] for _ in params]
    owner: dict[str, int] = {}
    by_name = {n: i for i, ns in enumerate(names) for n in ns}
    rule = _prefix_rule(set(source.shapes), set(by_name))
    for m in source.shapes:
        i = by_name.get(_apply(rule, m))
        if i is not None:
            shape = tuple(params[i].shape)
            if shape != source.shapes[m]:
                raise TensorMismatchError(f"{m}: mask shape {source.shapes[m]} != parameter shape {shape}")
            pieces[i].append(Piece(m, _whole(shape)))
            owner[m] = i

    fps = source.fingerprints
    if check:
        for m, i in owner.items():
            fp = fps.get(m)
            if fp is not None and full.fingerprint(i, _whole(params[i].shape), fp.split(":")[0]) != fp:
                raise TensorMismatchError(
                    f"{m}: the parameter differs from the base tensor the mask was computed on",
                    hint="apply the mask to the model it was computed from; to skip this check on purpose "
                         "(e.g. resuming), pass check_base=False")

    left = [m for m in source.shapes if m not in owner]
    if check and left and all(m in fps for m in left):  # content matching presumes base weights
        groups: dict[tuple, list[str]] = {}  # (fingerprint, shape) -> masks of bitwise-equal base tensors
        for m in left:
            groups.setdefault((fps[m], source.shapes[m]), []).append(m)
        dtypes = sorted({fps[m].split(":")[0] for m in left})
        for i, p in enumerate(params):
            if pieces[i]:
                continue
            for way in _content_boxes(tuple(p.shape)):
                found = []
                for box, shape in way:
                    hits = [groups.get((full.fingerprint(i, box, d), shape)) for d in dtypes]
                    hit = next((h for h in hits if h), None)
                    if hit is None:
                        break
                    found.append((box, hit))
                else:
                    for box, hit in found:
                        _same_masks(hit, source)
                        pieces[i].append(Piece(hit[0], box))
                        owner.update((m, i) for m in hit)
                    break
    unplaced = [m for m in source.shapes if m not in owner]
    if unplaced:
        raise MaskFileError(
            f"{source.label}: {len(unplaced)} mask(s) match no parameter by name{' or content' if check else ''}, "
            f"e.g. {unplaced[0]!r}",
            hint="check that the mask file was made for this model's base checkpoint, and that the parameters "
                 "still hold the base weights (content matching needs them); an optimizer over some of the "
                 "model's parameters (a frozen tower left out) takes mask_updates(model, masks, optimizer), "
                 "which sees them all" if check else
                 "with check_base=False masks are placed by name only: where the model renames or fuses the "
                 "checkpoint's tensors, resume with the masks in its coordinates (ckptprobe.train.model_masks)")
    return pieces


def _same_masks(names: list[str], source: MaskSource, tied: bool = False) -> None:
    """Names of one tensor (tied), or bitwise-equal base tensors told apart by nothing else, need equal masks."""
    first = source.array(names[0])
    for other in names[1:]:
        if np.array_equal(first, source.array(other)):
            continue
        if tied:
            raise TensorMismatchError(f"{names[0]} and {other} are the same (tied) tensor but have different masks")
        raise TensorMismatchError(
                f"{names[0]} and {other} hold bitwise-identical base tensors but different masks: "
                "which parameter is which cannot be told by content",
                hint="give the parameters' names (model.named_parameters()) so they are matched by name")


def _local_box(p: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The box of the full parameter this process holds (all of it unless `p` is a DTensor)."""
    if not is_dtensor(p):
        return _whole(p.shape)
    chunks = p.__create_chunk_list__()  # the shard's offsets and sizes, as distributed checkpoints record them
    if len(chunks) != 1:
        raise TensorMismatchError(f"a DTensor of shape {tuple(p.shape)} holds {len(chunks)} chunks on this rank")
    return tuple((int(o), int(o) + int(s)) for o, s in zip(chunks[0].offsets, chunks[0].sizes, strict=True))


def local_keep(p: torch.Tensor, pieces: list[Piece], source: MaskSource) -> np.ndarray:
    """The bool mask (True = trained) of the part of `p` this process holds, assembled from `pieces`.

    Pieces either all cover the whole parameter (its names; tied names must carry equal masks)
    or tile it (content matches). Holds only the local part once assembled.
    """
    box = _local_box(p)
    if all(pc.box == _whole(p.shape) for pc in pieces):
        _same_masks([pc.name for pc in pieces], source, tied=True)
        pieces = pieces[:1]
    keep = np.zeros(_box_shape(box), bool)
    for pc in pieces:
        lo = [max(a, la) for (a, _), (la, _) in zip(pc.box, box, strict=True)]
        hi = [min(b, lb) for (_, b), (_, lb) in zip(pc.box, box, strict=True)]
        if any(low >= high for low, high in zip(lo, hi, strict=True)):
            continue  # the piece lies on another rank's shard
        src = source.array(pc.name).reshape(_box_shape(pc.box))
        src_sl = tuple(slice(low - a, high - a) for low, high, (a, _) in zip(lo, hi, pc.box, strict=True))
        dst_sl = tuple(slice(low - a, high - a) for low, high, (a, _) in zip(lo, hi, box, strict=True))
        keep[dst_sl] = src[src_sl]
    return keep
