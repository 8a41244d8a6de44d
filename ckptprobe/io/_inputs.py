"""The files a command reads: no output of the same command may replace one (`-o` naming an input).

Recorded only within `guarding_inputs` (a command-line run): a script using the library may well
write a new version of a file it read. Outputs are checked before the work (`writer.check_writable`
notes each existing one), inputs as they are opened, which is before the work too: whichever of
the two comes second finds the clash, so a run never computes a result it may not write.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from ckptprobe.errors import UsageError

# (device, inode) of each file a command has read a checkpoint or mask from; None: not recording (the
# library, where a script may well write a new version of what it read).
_inputs: set[tuple[int, int]] | None = None
_outputs: dict[tuple[int, int], str] = {}  # (device, inode) of each existing file a run will replace -> its path


@contextlib.contextmanager
def guarding_inputs() -> Iterator[None]:
    """Within: no output is written over a file read as input (a command-line run is one such block)."""
    global _inputs, _outputs
    previous, _inputs, outputs, _outputs = _inputs, set(), _outputs, {}
    try:
        yield
    finally:
        _inputs, _outputs = previous, outputs


def note_input(st: os.stat_result) -> None:
    """Record a file read as input (a checkpoint's file or index, its config, a mask file), within
    `guarding_inputs`; UsageError when an output of the run already names it."""
    if _inputs is None:
        return
    key = (st.st_dev, st.st_ino)
    if key in _outputs:
        raise UsageError(f"{_outputs[key]}: an output of this run, and also one of its inputs: refusing to write "
                         "over it", hint="write the result to another file")
    _inputs.add(key)


def note_output(st: os.stat_result, path: str) -> None:
    """Record an existing file that an output of this run will replace, within `guarding_inputs`."""
    if _inputs is not None:
        _outputs[(st.st_dev, st.st_ino)] = path


def is_input(st: os.stat_result) -> bool:
    """Whether the file of `st` was read as input within the current `guarding_inputs` block."""
    return bool(_inputs) and (st.st_dev, st.st_ino) in _inputs
