"""Every exception ckptprobe raises on purpose.

Each subclasses a builtin as well, so callers can catch either
(`except FileNotFoundError` keeps working). The CLI turns any `CkptprobeError`
into one line `Error: ...` (plus its `hint`) on stderr and exit code 1;
`UsageError` exits 2.
"""

from __future__ import annotations


class CkptprobeError(Exception):
    """Base class. `hint`, when set, tells the user what to try next."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(CkptprobeError, ValueError):
    """The command line asks for something impossible (bad option value, too few runs).

    `param`, when set, is the name of the Python parameter at fault (`"k"`, `"alpha"`): the message
    speaks of it as `k=...`, and the CLI shows the matching flag instead (`-k ...`).
    """

    def __init__(self, message: str, hint: str | None = None, param: str | None = None):
        super().__init__(message, hint)
        self.param = param


class CheckpointNotFoundError(CkptprobeError, FileNotFoundError):
    """A reference is neither a file, a folder nor a reachable Hub repo, or a shard is missing."""


class InvalidCheckpointError(CkptprobeError, ValueError):
    """A checkpoint file exists but is malformed: truncated, bad header, bad index, pickle."""


class TensorMismatchError(CkptprobeError, ValueError):
    """Tensors that must match (base vs fine-tune, mask vs parameter) do not."""


class MaskFileError(CkptprobeError, ValueError):
    """A mask file is malformed or does not belong to the model it is applied to."""


class HubError(CkptprobeError, ConnectionError):
    """The Hub (or the endpoint in HF_ENDPOINT) refused, could not be reached, or is offline."""


class DeviceError(CkptprobeError, RuntimeError):
    """A compute device was asked for but is not available."""


class NoMatchingTensorsError(CkptprobeError, LookupError):
    """A name filter (--include/--exclude) selects no tensor of a checkpoint."""
