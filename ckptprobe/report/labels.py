"""One rule for the short name of a checkpoint in tables, legends and titles."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def label(ref: str) -> str:
    """A short name for a checkpoint in tables and legends: its folder or file name, without
    `.safetensors` (a folder's name for `folder/model.safetensors`), or the Hub repo's name and revision."""
    text = ref.rstrip("/") or ref
    p = Path(text)
    hub = (text.count("/") == 1 and not text.startswith((".", "/", "~")) and p.suffix not in (".safetensors", ".json")
           and not p.expanduser().exists())
    if hub:
        return text.split("/")[1]  # a Hub repo org/name[@rev]
    generic = p.name in ("model.safetensors", "model.safetensors.index.json") and p.parent.name
    name = p.parent.name if generic else p.name
    return name.removesuffix(".safetensors") or ref


def labels(refs: Sequence[str]) -> list[str]:
    """`label` of each reference, or the references themselves when two labels would be equal."""
    short = [label(r) for r in refs]
    return short if len(set(short)) == len(short) else list(refs)
