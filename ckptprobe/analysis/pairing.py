"""Pairing tensors of a base and its fine-tunes by name, with --include/--exclude globs."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Sequence

from ckptprobe.io.sources import TensorSource


@dataclass(frozen=True)
class Skipped:
    """A tensor left out of an analysis, and why ("only in base", "shape (3, 4) vs (5, 4) in ft", ...)."""

    name: str
    reason: str

    def to_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason}


def selected(name: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """True if `name` matches one of `include` (or there is none) and none of `exclude`."""
    return (not include or any(fnmatchcase(name, p) for p in include)) and not any(
        fnmatchcase(name, p) for p in exclude)


def pair_tensors(base: TensorSource, others: Sequence[TensorSource], include: Sequence[str] = (),
                 exclude: Sequence[str] = ()) -> tuple[list[str], list[Skipped]]:
    """Names present with one shape in the base and every other source, in the base's order.

    Everything else that the filters select is returned as `Skipped` with the reason.
    """
    keep, skipped = [], []
    other_keys = [set(o.keys()) for o in others]
    for name in base.keys():
        if not selected(name, include, exclude):
            continue
        shape = base.info(name).shape
        reason = None
        for other, keys in zip(others, other_keys):
            if name not in keys:
                reason = f"only in base (missing in {other.ref})"
            elif other.info(name).shape != shape:
                reason = f"shape {shape} in base vs {other.info(name).shape} in {other.ref}"
            if reason:
                break
        if reason:
            skipped.append(Skipped(name, reason))
        else:
            keep.append(name)
    seen = set(base.keys())
    for other in others:
        for name in other.keys():
            if name not in seen and selected(name, include, exclude):
                seen.add(name)
                skipped.append(Skipped(name, f"only in {other.ref} (missing in base)"))
    return keep, skipped
