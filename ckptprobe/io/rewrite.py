"""Writing a transformed copy of a local checkpoint folder: same shards, names, dtypes and files.

`rewrite_folder` reads the base one tensor at a time, lets a function replace it, and
writes each shard (with the base's metadata plus the caller's) into a new folder, with
the index and every other top-level file (config.json, tokenizer files, ...) copied.
Each file is written atomically, one tensor in memory at a time; the output folder must
be new or empty, so nothing is ever replaced and a stale shard can never mix with new ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ckptprobe.errors import CheckpointNotFoundError, InvalidCheckpointError, UsageError
from ckptprobe.io._safetensors import STORAGE_DTYPES, SafetensorsFile, TensorInfo
from ckptprobe.io.sources import PICKLE_SUFFIXES, model_files, open_folder
from ckptprobe.io.writer import atomic_write, write_safetensors

# (name, info, storage array) -> the storage array to write (same dtype and shape)
Transform = Callable[[str, TensorInfo, np.ndarray], np.ndarray]


def shard_files(folder: Path) -> tuple[str | None, list[Path]]:
    """The model's index in the folder (None without one) and its safetensors files, in order: the index's
    shards, or the files (`model_files`)."""
    open_folder(folder)  # validates the index, the shards and that no tensor is held twice
    index, files = model_files([p.name for p in folder.iterdir()], str(folder))
    if index:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        return index, [folder / s for s in sorted(set(map(str, weight_map.values())))]
    return None, [folder / f for f in files]


def check_output_folder(base: Path, out: Path) -> None:
    """UsageError unless `out` is a new or empty folder other than `base`."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"{out}: exists and is not a folder")
        if out.resolve() == base.resolve():
            raise UsageError(f"{out}: the output folder is the base itself", hint="write to a new folder")
        if any(out.iterdir()):
            raise UsageError(f"{out}: folder is not empty; refusing to mix new files with what is there",
                             hint="choose a new folder, or empty this one")


class _Deferred:
    """A tensor to write, read and transformed only when the writer asks for its bytes (`__array__`), so
    memory holds one tensor at a time. Shape, dtype and size come from the header; `transform` must keep
    them. The names of the tensors it changed are appended to `changed`."""

    def __init__(self, file: SafetensorsFile, name: str, transform: Transform, changed: list[str]):
        self.file, self.name, self.transform, self.changed = file, name, transform, changed
        info = file.info(name)
        self.dtype, self.shape, self.nbytes = np.dtype(STORAGE_DTYPES[info.dtype]), info.shape, info.nbytes

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        raw = self.file.get_array(self.name)
        new = self.transform(self.name, self.file.info(self.name), raw)
        if new.dtype != raw.dtype or new.shape != raw.shape:
            raise InvalidCheckpointError(f"{self.name}: transform returned {new.dtype} {new.shape} "
                                         f"for {raw.dtype} {raw.shape}")
        if new is not raw and not np.array_equal(new, raw):
            self.changed.append(self.name)
        return new


def rewrite_folder(base: str | os.PathLike, out: str | os.PathLike, transform: Transform,
                   metadata: Mapping[str, str] | None = None, extra_files: Mapping[str, str] | None = None,
                   progress: Callable[[str], None] | None = None) -> list[str]:
    """Copy the checkpoint folder `base` into the new folder `out`, passing every tensor through `transform`.

    Shard files keep their names and tensors; each gets the base's metadata updated with
    `metadata`. Other regular top-level files are copied, except other copies of the weights
    (safetensors beside the model's, pickles and their indexes), which would keep the old
    values; `extra_files` ({name: text}) are
    written first, so an interrupted run leaves them behind as a marker. Returns the names
    of the tensors `transform` changed (by value).
    """
    base, out = Path(base), Path(out)
    if not base.is_dir():
        raise CheckpointNotFoundError(f"{base}: not a local checkpoint folder",
                                      hint="download a Hub model first, e.g. `hf download ORG/NAME --local-dir DIR`")
    check_output_folder(base, out)
    index, shards = shard_files(base)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (extra_files or {}).items():
        with atomic_write(out / name, "w") as f:
            f.write(text)
    changed: list[str] = []
    for path in shards:
        f = SafetensorsFile(path)
        tensors = {name: (f.info(name).dtype, _Deferred(f, name, transform, changed)) for name in f.keys()}
        write_safetensors(out / path.name, tensors, {**f.metadata, **(metadata or {})})
        if progress:
            progress(f"wrote {out / path.name}")
    written = {p.name for p in shards} | set(extra_files or {})
    for path in sorted(base.iterdir()):
        if path.name in written or not path.is_file() or path.name.startswith("."):
            continue
        if path.name != index and path.name.endswith((".safetensors", ".index.json", *PICKLE_SUFFIXES)):
            if progress:  # another copy of the weights (pickles, Mistral's consolidated.safetensors): the old ones
                progress(f"left out {path.name}: weights the rewrite does not hold")
            continue
        with open(path, "rb") as src, atomic_write(out / path.name) as dst:
            shutil.copyfileobj(src, dst)
    return changed
