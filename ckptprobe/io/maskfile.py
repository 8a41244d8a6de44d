"""Mask files: one bit-packed boolean mask per parameter, in a safetensors file.

Layout: each mask is a 1-D uint8 tensor, 8 entries a byte, little bit order
(`np.packbits(..., bitorder="little")`), so a 7B model's masks take under 1 GB.
The file's `__metadata__["ckptprobe"]` is a JSON object with the recipe (kind,
expression, base reference, k, alpha, seed, ...) and, per tensor, its `shape`,
`density` and a `fingerprint` of the base tensor it was computed from, so a mask is
never applied to the wrong model or silently broadcast.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ckptprobe.errors import DeviceError, InvalidCheckpointError, MaskFileError, UsageError
from ckptprobe.io._safetensors import SafetensorsFile
from ckptprobe.io.writer import write_safetensors

FORMAT = 1
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)  # set bits of each byte value


def pack(mask: np.ndarray) -> np.ndarray:
    """bool array, any shape -> uint8 (ceil(numel/8),), little bit order."""
    return np.packbits(mask.reshape(-1), bitorder="little")


def unpack(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack`: uint8 bits -> bool array of `shape`."""
    n = int(np.prod(shape, dtype=np.int64))
    return np.unpackbits(packed, count=n, bitorder="little").view(np.bool_).reshape(shape)


def fingerprint(raw: np.ndarray, dtype: str) -> str:
    """`dtype:hash` of a tensor's stored bytes (C order); equal iff the stored tensors are bitwise equal."""
    digest = hashlib.blake2b(np.ascontiguousarray(raw).view(np.uint8).data, digest_size=16).hexdigest()
    return f"{dtype}:{digest}"


@dataclass(frozen=True)
class PackedMask:
    """A mask already bit-packed: `bits` uint8 (ceil(numel/8),) as `pack` makes it, `count` True entries.

    `extra` is written into the tensor's metadata entry beside shape, density and fingerprint
    (e.g. the rank k a principal mask used).
    """

    shape: tuple[int, ...]
    bits: np.ndarray
    count: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_bool(cls, mask: np.ndarray) -> "PackedMask":
        return cls(tuple(mask.shape), pack(mask), int(np.count_nonzero(mask)))


def write_packed(path: str | os.PathLike, masks: Mapping[str, PackedMask], recipe: Mapping,
                 fingerprints: Mapping[str, str]) -> None:
    """Write packed masks with the `recipe` dict and per-tensor base fingerprints (atomically)."""
    tensors, entries = {}, {}
    for name, m in masks.items():
        n = int(np.prod(m.shape, dtype=np.int64))
        if m.bits.dtype != np.uint8 or m.bits.shape != ((n + 7) // 8,):
            raise ValueError(f"{name}: packed bits {m.bits.shape} {m.bits.dtype} do not fit shape {m.shape}")
        tensors[name] = ("U8", m.bits)
        entries[name] = {"shape": list(m.shape), "density": m.count / n if n else 0.0,
                         "fingerprint": fingerprints.get(name), **m.extra}
    meta = {"format": FORMAT, **recipe, "tensors": entries}
    write_safetensors(path, tensors, {"ckptprobe": json.dumps(meta)})


def write_masks(path: str | os.PathLike, masks: Mapping[str, np.ndarray], recipe: Mapping,
                fingerprints: Mapping[str, str]) -> None:
    """Write boolean `masks` {name: bool array} with the `recipe` dict and per-tensor base fingerprints."""
    write_packed(path, {name: PackedMask.from_bool(np.asarray(m)) for name, m in masks.items()}, recipe,
                 fingerprints)


@dataclass(frozen=True)
class MaskFile:
    """A mask file read and checked: `recipe` (metadata without tensors) and per-tensor entries."""

    path: str
    recipe: dict
    tensors: dict  # name -> {"shape": [...], "density": float, "fingerprint": str | None}
    _file: SafetensorsFile = field(repr=False)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def mask(self, name: str) -> np.ndarray:
        """The boolean mask of `name`, shaped like its parameter."""
        return unpack(self._file.read(name), self.shape(name))

    def count(self, name: str) -> int:
        """True entries of `name`'s mask, counted from the stored bits (padding bits ignored)."""
        bits = self._file.read(name)
        n = int(np.prod(self.shape(name), dtype=np.int64))
        full = n // 8
        total = int(_POPCOUNT[bits[:full]].sum(dtype=np.int64))
        if n % 8:
            total += int(_POPCOUNT[bits[full] & ((1 << (n % 8)) - 1)])
        return total


def read_masks(path: str | os.PathLike) -> MaskFile:
    """Open a mask file, refusing one that is truncated, not a mask file, or inconsistent."""
    if not os.path.isfile(path):
        raise MaskFileError(f"{path}: no such mask file")
    try:
        f = SafetensorsFile(path)
    except InvalidCheckpointError as e:
        raise MaskFileError(f"not a valid mask file: {e}") from None
    try:
        meta = json.loads(f.metadata["ckptprobe"])
        tensors = meta.pop("tensors")
    except (KeyError, json.JSONDecodeError, TypeError, AttributeError):
        raise MaskFileError(f"{path}: not a ckptprobe mask file (no 'ckptprobe' metadata)",
                            hint="write one with `ckptprobe masks BASE --kind ...`") from None
    if meta.get("format") != FORMAT:
        raise MaskFileError(f"{path}: mask file format {meta.get('format')!r}, this version reads {FORMAT}")
    if not isinstance(tensors, dict) or set(tensors) != set(f.keys()):
        raise MaskFileError(f"{path}: metadata and stored masks name different tensors")
    for name, entry in tensors.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        fingerprint = entry.get("fingerprint") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and (fingerprint is None or isinstance(fingerprint, str) and all(fingerprint.partition(":")[::2]))):
            raise MaskFileError(f"{path}: mask {name!r} has a malformed metadata entry {str(entry)[:200]}")
        info = f.info(name)
        n = math.prod(shape)  # exact: a product that overflows int64 must not wrap to a small number
        if n >= 1 << 62:
            raise MaskFileError(f"{path}: mask {name!r} claims shape {tuple(shape)}, {n:,} entries")
        if info.dtype != "U8" or info.shape != ((n + 7) // 8,):
            raise MaskFileError(f"{path}: mask {name!r} holds {info.shape} {info.dtype}, "
                                f"expected ({(n + 7) // 8},) U8 for shape {tuple(entry['shape'])}")
    return MaskFile(str(path), meta, tensors, f)


def check_against(masks: MaskFile, shapes: Mapping[str, tuple[int, ...]],
                  fingerprints: Mapping[str, str] | None = None) -> None:
    """Raise MaskFileError unless every mask matches the model's shape (and fingerprint, when given).

    `shapes`/`fingerprints` describe the model: {name: shape}, {name: fingerprint}. Masks
    for names the model lacks are refused too: a mask is never silently ignored.
    """
    problems = []
    for name, entry in masks.tensors.items():
        if name not in shapes:
            problems.append(f"{name}: not in the model")
        elif tuple(shapes[name]) != tuple(entry["shape"]):
            problems.append(f"{name}: mask shape {tuple(entry['shape'])} != model shape {tuple(shapes[name])}")
        elif fingerprints and entry.get("fingerprint") and fingerprints.get(name) not in (None, entry["fingerprint"]):
            problems.append(f"{name}: the model's tensor differs from the base the mask was computed on")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MaskFileError(f"{masks.path} does not match the model: {problems[0]}{more}")


class MaskSet(dict):
    """{parameter name: bool torch tensor}, with the file's `recipe` and base `fingerprints`."""

    recipe: dict
    fingerprints: dict

    def save(self, path: str | os.PathLike) -> None:
        """Write these masks as a mask file (atomically)."""
        write_masks(path, {n: m.cpu().numpy() for n, m in self.items()}, getattr(self, "recipe", {}),
                    getattr(self, "fingerprints", {}))


def load_masks(path: str | os.PathLike, device="cpu") -> MaskSet:
    """Load a mask file as boolean torch tensors on `device`, shaped like their parameters."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"load_masks: device {device!r} is not a torch device ({e})") from None
    if kind == "cuda" and not torch.cuda.is_available():  # else torch fails with an AssertionError
        raise DeviceError(f"load_masks: device {str(device)!r} asked for, but torch sees no CUDA device "
                          f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)",
                          hint='load onto device="cpu"')
    mf = read_masks(path)
    out = MaskSet({name: torch.from_numpy(mf.mask(name).copy()).to(device) for name in mf.keys()})
    out.recipe = mf.recipe
    out.fingerprints = {n: e["fingerprint"] for n, e in mf.tensors.items() if e.get("fingerprint")}
    return out
