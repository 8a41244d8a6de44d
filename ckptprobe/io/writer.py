"""Writing output files without ever destroying what a path names, and writing safetensors from raw
numpy storage arrays.

Every file ckptprobe writes goes through `atomic_write`, which looks at what the path is first:

- a regular file, or nothing yet: the data lands in a temporary file beside it and is renamed over
  it only once complete, so a failed or interrupted run never leaves a half-written file behind
  (a replaced file keeps its permission bits; one we may not write is refused, as `>` would be);
- a symlink: followed; its target is written as above and the link stays a link;
- a character or block device, a named pipe or a Unix socket (`-o /dev/null`, `-o /dev/stdout`,
  `-o >(gzip > x.gz)`): written to directly; renaming over it would replace the device with a file;
- a directory: `IsADirectoryError`, before anything is written (`check_writable` says so up front).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, IO, Iterator, Mapping

from ckptprobe.io._inputs import is_input, note_output

if TYPE_CHECKING:  # numpy is loaded by `write_safetensors` alone: writing a report needs no array library
    import numpy as np


def _refuse(path: Path, st: os.stat_result | None) -> None:
    """An input of this run, or a regular file we may not write (`>` would fail): never replaced."""
    if st is not None and is_input(st):
        raise FileExistsError(errno.EEXIST, "refusing to write over an input of this run", str(path))
    if st is not None and stat.S_ISREG(st.st_mode) and not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "the file is read-only", str(path))


def check_writable(path: str | os.PathLike) -> Path:
    """Raise OSError (naming `path`) when `atomic_write(path)` cannot succeed: a directory, a parent that
    is a file, a folder we may not write into. Cheap: call it before the work whose result goes there."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        st = os.stat(path)  # follows symlinks: what counts is what the link points to
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
        _refuse(path, st)
        if not stat.S_ISREG(st.st_mode):
            return path  # a device, pipe or socket is written in place
        note_output(st, str(path))  # an input opened later is refused then, before the work
    folder = Path(os.path.realpath(path)).parent
    while not folder.exists():  # atomic_write creates missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a folder", str(path))
    try:  # a file made and removed at once: what os.access cannot tell (root, a read-only mount, /proc)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ckptprobe-", suffix=".tmp")
    except OSError as e:
        raise PermissionError(e.errno or errno.EACCES, f"cannot create files in {folder}", str(path)) from None
    os.close(fd)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file object for `path` in `mode` ("w" or "wb"): a temporary file renamed over `path` on success
    (deleted on error) when `path` is a regular file or new; the target itself when it is a device, a
    pipe or a socket. Symlinks are followed."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    _refuse(path, st)
    if st is not None and not stat.S_ISREG(st.st_mode):
        with _open_special(path, st, mode) as f:
            yield f
        return
    target = Path(os.path.realpath(path))  # a symlink (even a dangling one) is followed to its target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))  # a replaced file keeps its permissions
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give a new file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _open_special(path: Path, st: os.stat_result, mode: str) -> Iterator[IO]:
    """Write into a device, a named pipe or a Unix socket in place."""
    if stat.S_ISSOCK(st.st_mode):
        import socket  # here: ~4 ms of start-up that every other output does without

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            with s.makefile(mode) as f:
                yield f
        return
    flags = os.O_WRONLY | (os.O_NONBLOCK if stat.S_ISFIFO(st.st_mode) else 0)
    try:
        fd = os.open(path, flags)  # no O_TRUNC, no O_CREAT: the node stays what it is
    except OSError as e:
        if e.errno == errno.ENXIO:  # a pipe that nobody reads would block forever
            raise OSError(errno.ENXIO, "no process is reading this named pipe", str(path)) from None
        raise
    os.set_blocking(fd, True)
    with os.fdopen(fd, mode) as f:
        yield f


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `{name: (safetensors dtype, storage array)}` as one .safetensors file.

    Arrays are in storage form (BF16 as uint16 bits, see `ckptprobe.analysis.bf16`),
    written in the order given, one at a time. Shapes come from the arrays.
    """
    import numpy as np

    from ckptprobe.io._safetensors import STORAGE_DTYPES

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
