"""Pairing tensors of two checkpoints by name: --include/--exclude globs, name prefixes, and
a guess of why two checkpoints share no name at all."""

from __future__ import annotations

import functools
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Sequence

from ckptprobe.errors import UsageError
from ckptprobe.io._safetensors import TensorInfo
from ckptprobe.io.config import local_config
from ckptprobe.io.names import parse_name
from ckptprobe.io.series import expand_braces
from ckptprobe.io.sources import TensorSource, locate

if TYPE_CHECKING:
    import numpy as np


def selected(name: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """True if `name` matches one of `include` (or there is none) and none of `exclude` (`globs`)."""
    return (not include or any(fnmatchcase(name, p) for p in globs(tuple(include)))) and not any(
        fnmatchcase(name, p) for p in globs(tuple(exclude)))


@functools.lru_cache(maxsize=256)
def globs(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The glob patterns with braces expanded as bash does, as checkpoint patterns are: `*.{q,k}_proj.*`
    is `*.q_proj.*` and `*.k_proj.*` (fnmatch alone would look for a literal brace, and match nothing)."""
    return tuple(g for p in patterns for g in expand_braces(p))


def layers_of(base: TensorSource, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[int]:
    """Sorted layer indices among the base's selected tensor names."""
    return sorted({p.layer for n in base.keys() if selected(n, include, exclude)
                   for p in [parse_name(n)] if p.layer is not None})


def check_layer(layer: int, layers: Sequence[int]) -> None:
    """UsageError naming the valid range if `layer` is not one of `layers`."""
    if layer not in layers:
        valid = f"{layers[0]}..{layers[-1]}" if layers and list(layers) == list(range(layers[0], layers[-1] + 1)) \
            else ", ".join(map(str, layers)) or "none (no tensor name has a layer index)"
        raise UsageError(f"layer {layer} does not exist; valid layers: {valid}")


class Renamed:
    """A source whose tensor names lose a prefix `strip` and then gain a prefix `add`.

    `Renamed(ft, strip="model.")` lets a bare model's names (`layers.0...`) meet a
    `...ForCausalLM` checkpoint's (`model.layers.0...`) once the other side is renamed
    too, or `Renamed(ft, add="model.")` renames the bare side. Names without `strip`
    keep it (`lm_head.weight` stays as it is). Reads go to the source under its own names.
    """

    def __init__(self, source: TensorSource, strip: str = "", add: str = ""):
        self.source, self.ref = source, source.ref
        self.forkable = getattr(source, "forkable", False)
        self._own = {}
        for name in source.keys():
            new = add + (name[len(strip):] if strip and name.startswith(strip) else name)
            self._own[new] = name

    def keys(self) -> list[str]:
        return list(self._own)

    def info(self, name: str) -> TensorInfo:
        info = self.source.info(self._own[name])
        return TensorInfo(name, info.dtype, info.shape)

    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        return self.source.read(self._own[name], start, stop, out)

    def locate(self, name: str) -> tuple[str, int] | None:
        return locate(self.source, self._own[name])

    def get_array(self, name: str) -> np.ndarray:
        return self.source.get_array(self._own[name])


def renamed(source: TensorSource, strip: str | None = None, add: str | None = None) -> TensorSource:
    """`source` itself when there is nothing to rename, else a `Renamed` view of it."""
    return Renamed(source, strip or "", add or "") if strip or add else source


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) + "." for i in range(1, len(parts))]


def prefix_fix(a: Sequence[str], b: Sequence[str]) -> tuple[str, str] | None:
    """A constant name prefix that makes most names of `b` names of `a`.

    Returns ("add", p) when `p + name` of `b` is a name of `a`, ("strip", p) when `b`'s
    names lose `p` to become names of `a`, or None. "Most" is at least half of the
    shorter list, so one shared `lm_head.weight` does not hide a `model.` prefix.
    """
    sa, sb = set(a), set(b)
    need = max(1, min(len(sa), len(sb)) // 2)
    for names, other, op in ((a, sb, "add"), (b, sa, "strip")):
        counts: dict[str, int] = {}
        for name in names:
            for p in _prefixes(name):
                if name[len(p):] in other:
                    counts[p] = counts.get(p, 0) + 1
        if counts:
            p, n = max(counts.items(), key=lambda kv: kv[1])
            if n >= need:
                return op, p
    return None


def architecture(source: TensorSource) -> str | None:
    """The `model_type` (else the first of `architectures`) in the config.json beside a local checkpoint."""
    data = local_config(source.ref) or {}
    archs = data.get("architectures")
    kind = data.get("model_type") or (archs[0] if isinstance(archs, list) and archs else None)
    return kind if isinstance(kind, str) else None


def why_disjoint(base: TensorSource, other: TensorSource) -> tuple[str, str | None]:
    """(a guess of why `base` and `other` share no tensor name, a hint or None)."""
    fix = prefix_fix(base.keys(), other.keys())
    if fix:
        op, p = fix
        where = f"{other.ref}'s names lack the prefix {p!r}" if op == "add" else \
            f"{other.ref}'s names carry an extra prefix {p!r}"
        return f"names differ by a prefix: {where}", f"rename them with --{op}-prefix {p}"
    for side in (other, base):
        if any(".lora_A." in n or ".lora_B." in n for n in side.keys()):
            return (f"{side.ref} is a LoRA adapter (lora_A/lora_B matrices), not a whole checkpoint",
                    "merge it into its base model first (peft: `model.merge_and_unload()`, then `save_pretrained`)")
    kinds = architecture(base), architecture(other)
    if all(kinds) and kinds[0] != kinds[1]:
        return f"different architectures: {kinds[0]} vs {kinds[1]}", None
    a, b = (next(iter(s.keys()), None) for s in (base, other))
    return f"e.g. {a!r} vs {b!r}; are they checkpoints of the same model?", None
