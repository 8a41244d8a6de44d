"""Reading one .safetensors file without trusting it and without loading it.

The format is `u64 little-endian header length | JSON header | raw bytes`. We parse
the header ourselves (instead of `safetensors.safe_open`) so that a malformed file
gives an error naming the file and what is wrong, and so that a tensor can be read
in element ranges through short-lived memory maps: a range's pages leave the
process's resident set as soon as its array is dropped, which keeps peak RSS at a
few tensors whatever the size of the model.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckptprobe.errors import InvalidCheckpointError

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces

# safetensors dtype -> numpy storage dtype. BF16 and FP8 have no numpy type: their raw
# bits are returned as unsigned integers of the same width (see `to_float32`).
STORAGE_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """What a header says of one tensor: no data is read to know it."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self) -> int:
        return np.dtype(STORAGE_DTYPES[self.dtype]).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def byte_span(info: TensorInfo, data_offset: int, start: int, stop: int | None) -> tuple[np.dtype, int, int]:
    """Elements [start, stop) of a tensor whose data begins at file byte `data_offset` ->
    (storage dtype, first byte, end byte) in the file; stop is clipped to the tensor, and an
    empty range has end <= first."""
    stop = info.numel if stop is None else min(stop, info.numel)
    dtype = np.dtype(STORAGE_DTYPES[info.dtype])
    return dtype, data_offset + start * dtype.itemsize, data_offset + stop * dtype.itemsize


def header_length(head: bytes, size: int, what: str) -> int:
    """The header length from a file's first 8 bytes, checked against the file's `size` in bytes."""
    if len(head) < 8:
        raise InvalidCheckpointError(f"{what}: file is {size} bytes, too short to be safetensors")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise InvalidCheckpointError(f"{what}: header claims {n} bytes (limit {MAX_HEADER_BYTES}); not a safetensors file?")
    if 8 + n > size:
        raise InvalidCheckpointError(f"{what}: header runs past the end of the file; the file is truncated")
    return n


def parse_header(raw: bytes, what: str, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]], dict[str, str]]:
    """Validate a header's JSON. Returns (infos, byte offsets relative to data start, metadata)."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpointError(f"{what}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidCheckpointError(f"{what}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InvalidCheckpointError(f"{what}: __metadata__ is not a JSON object")
    infos, offsets = {}, {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = dtype in STORAGE_DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(begin, int) and isinstance(end, int)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidCheckpointError(f"{what}: tensor {name!r} has a malformed header entry {entry!r}")
        info = TensorInfo(name, dtype, shape)
        if not 0 <= begin <= end or end - begin != info.nbytes:
            raise InvalidCheckpointError(
                f"{what}: tensor {name!r} has data_offsets [{begin}, {end}] that do not hold "
                f"{info.numel} {dtype} values ({info.nbytes} bytes)")
        if end > data_len:
            raise InvalidCheckpointError(
                f"{what}: tensor {name!r} runs past the end of the file (offset {end} > {data_len} data bytes);"
                " the file is truncated or corrupt")
        infos[name], offsets[name] = info, (begin, end)
    spans = sorted(offsets.items(), key=lambda kv: kv[1])
    for (a, (_, a_end)), (b, (b_begin, _)) in zip(spans, spans[1:]):
        if b_begin < a_end:
            raise InvalidCheckpointError(f"{what}: tensors {a!r} and {b!r} overlap in the file")
    return infos, offsets, {str(k): str(v) for k, v in metadata.items()}


class SafetensorsFile:
    """A local .safetensors file: header parsed at open, data read on demand.

    `read(name, start, stop)` returns elements [start, stop) of the flattened tensor
    as a read-only numpy array of the storage dtype (uint16 for BF16), backed by a
    memory map that lives exactly as long as the array.
    """

    forkable = True  # a forked child may read it (no connection or lock to share)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.ref = str(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                n = header_length(f.read(8), size, str(self.path))
                raw = f.read(n)
        except OSError as e:
            raise InvalidCheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        self._data_start = 8 + n
        self._infos, self._offsets, self.metadata = parse_header(raw, str(self.path), size - self._data_start)

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        dtype, begin, end = byte_span(self._infos[name], self._data_start + self._offsets[name][0], start, stop)
        if end <= begin:
            return np.empty(0, dtype)
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            # MAP_POPULATE maps every page up front: one system call instead of a page
            # fault per 4 KiB, about a third of the cost of reading page-cached data.
            mm = mmap.mmap(f.fileno(), end - aligned, offset=aligned, prot=mmap.PROT_READ,
                           flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        # The array keeps `mm` alive; when the array is dropped the map is unmapped.
        return np.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin - aligned)

    def get_array(self, name: str) -> np.ndarray:
        return self.read(name).reshape(self._infos[name].shape)
