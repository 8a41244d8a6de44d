"""Tensor sources: where a checkpoint's tensors come from, one tensor at a time.

Every source has the same small interface (the `TensorSource` protocol):
`ref` (what the user typed), `keys()`, `info(name)` (dtype and shape, no data read),
`read(name, start, stop)` (a flat element range in the storage dtype) and
`get_array(name)` (the whole tensor, shaped). `open_source` turns a reference into one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from ckptprobe.errors import CheckpointNotFoundError, InvalidCheckpointError
from ckptprobe.io._safetensors import SafetensorsFile, TensorInfo

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_HINT = ("pickle files can run arbitrary code and are never opened; convert the checkpoint with "
               "transformers' `model.save_pretrained(dir, safe_serialization=True)` and point ckptprobe at that")
HUB_REF = re.compile(r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[^\s]+))?$")


class TensorSource(Protocol):
    ref: str
    forkable: bool  # a forked worker process may read it (local files; not an HTTP session)

    def keys(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo: ...
    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray: ...
    def get_array(self, name: str) -> np.ndarray: ...


class MultiFileSource:
    """Several safetensors files seen as one checkpoint (a sharded folder, a Hub repo).

    `files` maps each file's name (as an index names it) to the opened file, local or
    remote: anything with `keys()`, `info(name)` and `read(name, start, stop)`. Headers
    are parsed at open (cheap), data is read on demand.
    """

    def __init__(self, ref: str, files: dict, weight_map: dict[str, str] | None = None):
        self.ref = ref
        self.metadata: dict[str, str] = {}
        self.forkable = all(getattr(f, "forkable", False) for f in files.values())
        self._where: dict = {}
        file_of: dict[str, str] = {}
        for filename, f in files.items():
            for name in f.keys():
                if name in self._where:
                    raise InvalidCheckpointError(f"{ref}: tensor {name!r} appears in both {file_of[name]} and {filename}")
                self._where[name], file_of[name] = f, filename
        for name, shard in (weight_map or {}).items():
            if file_of.get(name) != shard:
                raise InvalidCheckpointError(f"{ref}: the index puts {name!r} in {shard}, which does not hold it")

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._where[name].info(name)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._where[name].read(name, start, stop)

    def get_array(self, name: str) -> np.ndarray:
        return self.read(name).reshape(self.info(name).shape)


def _open_files(paths) -> dict[str, SafetensorsFile]:
    return {p.name: SafetensorsFile(p) for p in paths}


def _refuse_pickle(path: Path) -> None:
    raise InvalidCheckpointError(f"{path}: refusing to open a pickle checkpoint", hint=PICKLE_HINT)


def open_folder(folder: Path) -> MultiFileSource:
    """A folder with `*.safetensors.index.json`, `model.safetensors`, or several `*.safetensors`."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index_path = indexes[0]
        try:
            weight_map = json.loads(index_path.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise InvalidCheckpointError(f"{index_path}: not a safetensors index (no 'weight_map' object)")
        shards = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            # Checked by name, not by resolving: in the Hub cache every shard is a symlink into blobs/.
            if os.path.isabs(shard) or ".." in Path(shard).parts:
                raise InvalidCheckpointError(f"{index_path}: shard path {shard!r} points outside the folder")
            path = folder / shard
            if not path.is_file():
                raise CheckpointNotFoundError(f"{index_path}: names shard {shard!r}, which does not exist")
            shards[shard] = SafetensorsFile(path)
        return MultiFileSource(str(folder), shards, weight_map)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return MultiFileSource(str(folder), _open_files(files))
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        _refuse_pickle(pickles[0])
    raise CheckpointNotFoundError(f"{folder}: folder holds no *.safetensors files")


def open_source(ref: str, revision: str | None = None, token: str | bool | None = None,
                download: bool = False) -> TensorSource:
    """Resolve a checkpoint reference: a file, a folder, or a Hub repo.

    An existing local path always wins over a Hub name. Hub references are
    `org/name`, `org/name@revision` or `hf://org/name@revision`; `revision` applies
    to Hub references that do not name one with `@`.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return open_folder(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if path.name.endswith(".index.json"):
            return open_folder(path.parent)
        return MultiFileSource(ref, _open_files([path]))
    match = HUB_REF.match(ref)
    if match and not ref.startswith((".", "/", "~")):
        from ckptprobe.io.hub import HubSource  # only Hub users pay for importing huggingface_hub

        return HubSource(match["repo"], match["rev"] or revision, token=token, download=download, ref=ref)
    raise CheckpointNotFoundError(
        f"{ref}: no such file or folder, and not a Hub reference (org/name[@revision])")
