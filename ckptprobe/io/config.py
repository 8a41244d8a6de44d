"""The `config.json` beside a local checkpoint: what the analyses read of a model's architecture."""

from __future__ import annotations

import json
from pathlib import Path

from ckptprobe.io._inputs import note_input


def local_config(ref: str | Path) -> dict | None:
    """The JSON object in config.json beside a local file or in a local folder; None when there is none.

    A Hub reference, a missing or unreadable file, or JSON that is not an object all give None: a
    config only ever refines a guess or a default here, so its absence is never an error.
    """
    path = Path(ref).expanduser()
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    note_input(config.stat())  # read: no output of this run may replace it
    return data if isinstance(data, dict) else None
