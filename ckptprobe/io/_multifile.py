"""The tensor-source interface, and several safetensors files seen as one checkpoint.

Every source has the same small interface (the `TensorSource` protocol):
`ref` (what the user typed), `keys()`, `info(name)` (dtype and shape, no data read),
`read(name, start, stop, out=None)` (a flat element range in the storage dtype; `out`, a
uint8 buffer the source may fill and return a view of instead of mapping or allocating:
use what `read` returns; give it `READ_SLACK` bytes more than the range for the fastest
copy) and `get_array(name)` (the whole tensor, shaped). A source of local files also has
`locate(name)` (see `locate`). Local folders and Hub repos are both a
`MultiFileSource` over their files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ckptprobe.errors import InvalidCheckpointError
from ckptprobe.io._safetensors import READ_SLACK, TensorInfo

if TYPE_CHECKING:
    import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_HINT = ("pickle files can run arbitrary code and are never opened; convert the checkpoint with "
               "transformers' `model.save_pretrained(dir, safe_serialization=True)` and point ckptprobe at that")


def model_files(names: list[str], where: str) -> tuple[str | None, list[str]]:
    """Which of a folder's files (`names`, in it) hold the model: (its index or None, its safetensors files).

    As transformers picks them: `model.safetensors`, else `model.safetensors.index.json`; else the
    folder's one `*.safetensors.index.json`, else every `*.safetensors` (files without an index).
    A folder may hold other safetensors beside the model's (Mistral's `consolidated.safetensors`, the
    same weights under other names); opening them too would count each weight twice. Several
    indexes, none of them the standard one, name no model: InvalidCheckpointError.
    The safetensors list is empty for an index (its weight map names the shards) and where there is none.
    """
    if "model.safetensors" in names:
        return None, ["model.safetensors"]
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    if "model.safetensors.index.json" in indexes:
        return "model.safetensors.index.json", []
    if len(indexes) > 1:
        raise InvalidCheckpointError(f"{where}: {len(indexes)} safetensors indexes ({', '.join(indexes[:4])}), none "
                                     "named model.safetensors.index.json: which one describes the model?",
                                     hint="keep one index in the folder")
    if indexes:
        return indexes[0], []
    return None, sorted(n for n in names if n.endswith(".safetensors"))


class TensorSource(Protocol):
    ref: str
    forkable: bool  # a forked worker process may read it (local files; not an HTTP session)

    def keys(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo: ...
    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray: ...
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

    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        return self._where[name].read(name, start, stop, out)

    def locate(self, name: str) -> tuple[str, int] | None:
        return locate(self._where[name], name)

    def get_array(self, name: str) -> np.ndarray:
        return self.read(name).reshape(self.info(name).shape)


def locate(source, name: str) -> tuple[str, int] | None:
    """(path, byte offset of its first element) of a tensor that `source` holds in a local safetensors
    file, for readers that read the bytes themselves; None for any other source (the Hub)."""
    find = getattr(source, "locate", None)
    return find(name) if find is not None else None
