"""The files a command reads: no output of the same command may replace one (`-o` naming an input).

Recorded only within `guarding_inputs` (a command-line run): a script using the library may well
write a new version of a file it read.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# (device, inode) of each file a command has read a checkpoint or mask from; None: not recording (the
# library, where a script may well write a new version of what it read).
_inputs: set[tuple[int, int]] | None = None


@contextlib.contextmanager
def guarding_inputs() -> Iterator[None]:
    """Within: no output is written over a file read as input (a command-line run is one such block)."""
    global _inputs
    previous, _inputs = _inputs, set()
    try:
        yield
    finally:
        _inputs = previous


def note_input(st: os.stat_result) -> None:
    """Record a file read as input (a checkpoint's file or index, a mask file), within `guarding_inputs`."""
    if _inputs is not None:
        _inputs.add((st.st_dev, st.st_ino))


def is_input(st: os.stat_result) -> bool:
    """Whether the file of `st` was read as input within the current `guarding_inputs` block."""
    return bool(_inputs) and (st.st_dev, st.st_ino) in _inputs
