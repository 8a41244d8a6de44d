"""Writing files atomically, and writing safetensors from raw numpy storage arrays.

Every file ckptprobe writes goes through `atomic_write`: the data lands in a
temporary file beside the target and is renamed over it only once complete, so a
failed or interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Mapping

import numpy as np

from ckptprobe.io._safetensors import STORAGE_DTYPES


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to `path`; rename it to `path` on success, delete it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `{name: (safetensors dtype, storage array)}` as one .safetensors file.

    Arrays are in storage form (BF16 as uint16 bits, see `ckptprobe.analysis.bf16`),
    written in the order given, one at a time. Shapes come from the arrays.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, array) in tensors.items():
        if np.dtype(STORAGE_DTYPES[dtype]) != array.dtype:
            raise TypeError(f"{name}: array of {array.dtype} cannot be stored as {dtype}")
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align data to 8 bytes, as safetensors does
    with atomic_write(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, array in tensors.values():
            f.write(np.ascontiguousarray(array).data)
