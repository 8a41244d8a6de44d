"""Tensor sources: where a checkpoint's tensors come from, one tensor at a time.

Every source has the same small interface (the `TensorSource` protocol):
`ref` (what the user typed), `keys()`, `info(name)` (dtype and shape, no data read),
`read(name, start, stop, out=None)` (a flat element range in the storage dtype, copied
into the uint8 buffer `out` where the source can) and `get_array(name)` (the whole tensor,
shaped). `open_source` turns a reference into one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ckptprobe.errors import CheckpointNotFoundError, InvalidCheckpointError, UsageError
from ckptprobe.io._inputs import note_input
from ckptprobe.io._multifile import PICKLE_HINT, PICKLE_SUFFIXES, READ_SLACK  # noqa: F401 (re-exported)
from ckptprobe.io._multifile import MultiFileSource, TensorSource, locate, model_files  # noqa: F401 (re-exported)
from ckptprobe.io._safetensors import MAX_HEADER_BYTES, SMALL_READ, SafetensorsFile, regular_size  # noqa: F401

# org/name[@revision][:sub/folder]; git forbids ':' in ref names, so it cannot be part of a revision.
HUB_REF = re.compile(r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[^\s:]+))?(?::(?P<sub>\S*))?$")
PATTERN = re.compile(r"[*?\[]|\{[^{}]*(?:,|\.\.)[^{}]*\}")  # a glob, or a brace list / range


@dataclass(frozen=True)
class HubRef:
    """A Hub checkpoint reference: repo, revision (None: the caller's default) and subfolder ("": root)."""

    repo: str
    revision: str | None = None
    subfolder: str = ""

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.subfolder}" if self.subfolder else "")


def parse_hub_ref(ref: str) -> HubRef | None:
    """`org/name[@revision][:sub/folder]` (optionally `hf://`) -> HubRef; None when `ref` is not of that form."""
    match = HUB_REF.match(ref)
    if match is None or ref.startswith((".", "/", "~")):
        return None
    sub = (match["sub"] or "").strip("/")
    if sub and any(part in ("", ".", "..") for part in sub.split("/")):
        raise CheckpointNotFoundError(f"{ref}: subfolder {sub!r} is not a path inside the repo",
                                      hint="write it as org/name@revision:folder/inside/the/repo")
    return HubRef(match["repo"], match["rev"], sub)


def _open_files(paths) -> dict[str, SafetensorsFile]:
    return {p.name: SafetensorsFile(p) for p in paths}


def _refuse_pickle(path: Path) -> None:
    raise InvalidCheckpointError(f"{path}: refusing to open a pickle checkpoint", hint=PICKLE_HINT)


def open_folder(folder: Path) -> MultiFileSource:
    """A folder with `model.safetensors`, an index and its shards, or several `*.safetensors` (`model_files`)."""
    names = [p.name for p in folder.iterdir()]
    if "config.json" in names and (folder / "config.json").is_file():
        note_input((folder / "config.json").stat())  # part of the checkpoint: no output of this run replaces it
    index, files = model_files(names, str(folder))
    if index:
        index_path = folder / index
        size = regular_size(index_path)
        if size > MAX_HEADER_BYTES:
            raise InvalidCheckpointError(f"{index_path}: {size:,} bytes, too large for an index")
        try:
            weight_map = json.loads(index_path.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError, RecursionError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise InvalidCheckpointError(f"{index_path}: not a safetensors index (no 'weight_map' object)")
        shards = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            # Checked by name, not by resolving: in the Hub cache every shard is a symlink into blobs/.
            if os.path.isabs(shard) or ".." in Path(shard).parts:
                raise InvalidCheckpointError(f"{index_path}: shard path {shard!r} points outside the folder")
            path = folder / shard
            if not path.exists():
                raise CheckpointNotFoundError(f"{index_path}: names shard {shard!r}, which does not exist")
            shards[shard] = SafetensorsFile(path)
        return MultiFileSource(str(folder), shards, weight_map)
    if files:
        return MultiFileSource(str(folder), _open_files(folder / f for f in files))
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        _refuse_pickle(folder / pickles[0])
    raise CheckpointNotFoundError(f"{folder}: folder holds no *.safetensors files")


def open_source(ref: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                download: bool = False) -> TensorSource:
    """Resolve a checkpoint reference: a file, a folder, or a Hub repo (or a folder in one).

    An existing local path always wins over a Hub name, and so does an existing local folder: `run/step-3`
    inside a local `run/` is a missing local checkpoint (`hf://run/step-3` names the repo). Hub references are
    `org/name`, `org/name@revision`, `org/name@revision:sub/folder` (or `org/name:sub/folder`),
    optionally prefixed `hf://`; `revision` applies to Hub references that do not name one
    with `@`. A pattern naming many checkpoints (`org/name@step-*`) is refused here: expand it
    with `ckptprobe.io.series.expand_refs` first.
    """
    ref = os.fspath(ref)
    try:
        path = Path(ref).expanduser()
    except RuntimeError:  # `~user/...` of a user this system does not know
        user = ref.split("/")[0]
        raise CheckpointNotFoundError(f"{ref}: no such file or folder ({user!r}: no such user)") from None
    if path.is_dir():
        return open_folder(path)
    if path.exists() and not path.is_file():
        raise InvalidCheckpointError(f"{ref}: not a regular file or folder")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if path.name.endswith(".index.json"):
            return open_folder(path.parent)
        return MultiFileSource(ref, _open_files([path]))
    if path.is_symlink():  # a link to nothing (or a loop) is a local path all the same, never a Hub name
        raise CheckpointNotFoundError(f"{ref}: a broken symbolic link (to {os.readlink(path)})")
    hub = parse_hub_ref(ref)
    if PATTERN.search(ref):
        raise UsageError(f"{ref}: a pattern names many checkpoints, and one is expected here",
                         hint="drift, profile and consensus take patterns; elsewhere name one checkpoint")
    if hub is not None and not ref.startswith("hf://") and path.parent.is_dir():
        # `run/step-3` beside `run/step-1`: a local folder's missing entry (a gap in a series), not a repo
        raise CheckpointNotFoundError(f"{ref}: no such file or folder in the local folder {path.parent}",
                                      hint=f"for the Hub repo of that name, write hf://{ref}")
    if hub is not None:
        from ckptprobe.io.hub import HubSource  # only Hub users pay for importing huggingface_hub

        return HubSource(hub.repo, hub.revision or revision, token=token, download=download, ref=ref,
                         subfolder=hub.subfolder)
    raise CheckpointNotFoundError(
        f"{ref}: no such file or folder, and not a Hub reference (org/name[@revision][:folder])")
