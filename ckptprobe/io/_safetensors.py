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
import math
import mmap
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckptprobe.errors import InvalidCheckpointError
from ckptprobe.io._inputs import note_input

if TYPE_CHECKING:
    import numpy as np

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
SMALL_READ = 1 << 16  # bytes: ranges up to this size are copied with one pread instead of mapped
# Bytes an `out` buffer may hold beyond a range so that `read` can put the range at the file's
# offset within a page. The kernel copies page-cached data 4-5x slower (1.6 against 7.5 GB/s on
# AMD EPYC) when the destination sits a few bytes past the source modulo a page, a case a large
# `np.empty` (16 bytes into a page) meets for some tensors and not others.
READ_SLACK = 4096

# safetensors dtype -> numpy storage dtype, by name: numpy is imported by the reads that need it,
# not by a header (a whole `sparsity` run of 16-bit files never imports it). BF16 and FP8 have no
# numpy type: their raw bits are returned as unsigned integers of the same width (see `to_float32`).
STORAGE_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64",
    "F16": "float16", "BF16": "uint16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "uint8", "F8_E5M2": "uint8",
}
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
            "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}  # bytes per element
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """What a header says of one tensor: no data is read to know it."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    # derived once here: analyses ask for them per read, and a header may hold 100,000 tensors
    numel: int = field(init=False, repr=False, compare=False)  # a Python int: no int64 wrap-around
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "numel", math.prod(self.shape))
        object.__setattr__(self, "nbytes", self.numel * self.itemsize)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]


def byte_span(info: TensorInfo, data_offset: int, start: int, stop: int | None) -> tuple[np.dtype, int, int]:
    """Elements [start, stop) of a tensor whose data begins at file byte `data_offset` ->
    (storage dtype, first byte, end byte) in the file; stop is clipped to the tensor, and an
    empty range has end <= first."""
    import numpy as np

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


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Duplicate(dup)
    return out


class _Duplicate(Exception):
    pass


def _decode(raw: bytes, what: str) -> dict:
    """The header's JSON object: valid UTF-8 JSON ending exactly where the header does (whitespace may
    pad it, as the safetensors writer pads with spaces), no key twice. A valid header nests three
    levels deep ({name: {"shape": [...]}}); deeper structures fail the entry checks, and nesting too
    deep for the parser's recursion is refused here."""
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise InvalidCheckpointError(f"{what}: header is not valid UTF-8 ({e.reason} at header byte {e.start})") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            raise InvalidCheckpointError(
                f"{what}: header has {len(text[e.pos:].encode())} bytes after its JSON that are not spaces; its "
                "8-byte length does not match the header, or the file is corrupt") from None
        raise InvalidCheckpointError(f"{what}: header is not valid JSON ({e.msg} at character {e.pos}); the file "
                                     "is corrupt, or its 8-byte length does not match the header") from None
    except _Duplicate as e:
        raise InvalidCheckpointError(f"{what}: header names {e.args[0]!r} twice") from None
    except ValueError as e:  # _refuse_constant
        raise InvalidCheckpointError(f"{what}: header holds {e}, which is not JSON") from None
    except RecursionError:
        raise InvalidCheckpointError(f"{what}: header nests brackets thousands of levels deep; "
                                     "not a safetensors header") from None
    if not isinstance(header, dict):
        raise InvalidCheckpointError(f"{what}: header is not a JSON object")
    if "\\ud" in text.lower():  # a \uD800-\uDFFF escape: valid only as half of a pair
        try:
            json.dumps(header, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidCheckpointError(f"{what}: header holds an unpaired surrogate escape (\\uD800-\\uDFFF), "
                                         "which is not text") from None
    return header


def _refuse_constant(name: str):
    raise ValueError(name)  # NaN, Infinity: Python's json accepts them, JSON does not


def _entry(name: str, entry, what: str) -> tuple[TensorInfo, int, int]:
    """One tensor's header entry, checked: (info, begin, end) with offsets relative to the data start."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise InvalidCheckpointError(f"{what}: tensor {name!r} has a malformed header entry {str(entry)[:200]} "
                                     "(needs dtype, shape, data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
        raise InvalidCheckpointError(f"{what}: tensor {name!r} has dtype {str(dtype)[:40]!r}, which ckptprobe does "
                                     f"not read (it reads {', '.join(STORAGE_DTYPES)})")
    # `type(d) is int`: bool is an int subclass, and a float (2.0, 1e30) is not a count.
    if type(shape) is not list or not {type(d) for d in shape} <= {int} or min(shape, default=0) < 0:
        raise InvalidCheckpointError(f"{what}: tensor {name!r} has a malformed header entry: shape "
                                     f"{str(shape)[:200]} is not a list of non-negative integers")
    if not (type(offsets) is list and len(offsets) == 2 and {type(o) for o in offsets} == {int} and min(offsets) >= 0):
        raise InvalidCheckpointError(f"{what}: tensor {name!r} has a malformed header entry: data_offsets "
                                     f"{str(offsets)[:200]} is not [begin, end]")
    if math.prod(d or 1 for d in shape) * ITEMSIZE[dtype] >= 1 << 63:  # a zero among the dims hides nothing
        raise InvalidCheckpointError(f"{what}: tensor {name!r} has shape {str(shape)[:200]}, whose size "
                                     "a 64-bit count cannot hold")
    info = TensorInfo(name, dtype, tuple(shape))
    begin, end = offsets
    if end < begin or end - begin != info.nbytes:
        raise InvalidCheckpointError(
            f"{what}: tensor {name!r} has data_offsets [{begin}, {end}] that do not hold "
            f"{info.numel} {dtype} values ({info.nbytes} bytes)")
    return info, begin, end


def parse_header(raw: bytes, what: str, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]], dict[str, str]]:
    """Validate a header against the `data_len` bytes that follow it, as the safetensors library does
    (or stricter). Returns (infos, byte offsets relative to data start, metadata)."""
    header = _decode(raw, what)
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidCheckpointError(f"{what}: __metadata__ is not a JSON object of strings")
    infos, offsets = {}, {}
    for name, entry in header.items():
        info, begin, end = _entry(name, entry, what)
        if end > data_len:
            raise InvalidCheckpointError(
                f"{what}: tensor {name!r} runs past the end of the file (offset {end} > {data_len} data bytes);"
                " the file is truncated or corrupt")
        infos[name], offsets[name] = info, (begin, end)
    # The tensors must tile the data exactly, in some order: no overlap, no gap, nothing after the last.
    covered = 0
    previous = None
    for name, (begin, end) in sorted(offsets.items(), key=lambda kv: kv[1]):
        if begin < covered:
            raise InvalidCheckpointError(f"{what}: tensors {previous!r} and {name!r} overlap in the file")
        if begin > covered:
            raise InvalidCheckpointError(f"{what}: tensor {name!r} starts at data byte {begin}, leaving bytes "
                                         f"{covered}-{begin - 1} unused; the header does not describe the file")
        covered, previous = end, name
    if covered != data_len:
        raise InvalidCheckpointError(f"{what}: {data_len - covered} bytes follow the last tensor's data; the header "
                                     "does not describe the file")
    return infos, offsets, metadata


def regular_size(path: Path) -> int:
    """The size of `path`, a regular file (after symlinks) read as input; InvalidCheckpointError for a FIFO,
    a device or a socket, which an open() or a read could block on or never finish."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise InvalidCheckpointError(f"{path}: not a regular file")
    note_input(st)  # no output of this run may replace it
    return st.st_size


class SafetensorsFile:
    """A local .safetensors file: header parsed at open, data read on demand.

    `read(name, start, stop)` returns elements [start, stop) of the flattened tensor
    as a read-only numpy array of the storage dtype (uint16 for BF16): ranges above
    `SMALL_READ` bytes are backed by a memory map that lives exactly as long as the
    array, smaller ones are copied. With `out` (a contiguous uint8 array of at least the
    range's bytes), the range is copied into `out` and returned as a view of it, at the
    file's offset within a page when `out` has `READ_SLACK` bytes to spare; any other `out`
    is ignored.
    """

    forkable = True  # a forked child may read it (no connection or lock to share)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.ref = self._fspath = str(path)
        try:
            size = regular_size(self.path)
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

    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        import numpy as np

        dtype, begin, end = byte_span(self._infos[name], self._data_start + self._offsets[name][0], start, stop)
        if end <= begin:
            return np.empty(0, dtype)
        fd = os.open(self._fspath, os.O_RDONLY)
        try:
            if out is not None and out.dtype == np.uint8 and out.flags.c_contiguous and out.size >= end - begin:
                # Copied into the caller's buffer: about what a map costs the kernel, and the
                # bytes arrive in cache, where the caller's next pass finds them.
                shift = (begin - out.ctypes.data) % READ_SLACK if end - begin > SMALL_READ else 0
                shift = shift if out.size >= end - begin + shift else 0
                view = out[shift:shift + end - begin]
                if os.preadv(fd, [view], begin) != end - begin:
                    raise InvalidCheckpointError(f"{self.path}: tensor {name!r}: file shrank while being read")
                return view.view(dtype)
            if end - begin <= SMALL_READ:
                # A copy is cheaper than a map for a few pages: a few microseconds instead of ~40 us per tiny tensor.
                data = os.pread(fd, end - begin, begin)
                if len(data) != end - begin:
                    raise InvalidCheckpointError(f"{self.path}: tensor {name!r}: file shrank while being read")
                return np.frombuffer(data, dtype)
            if os.fstat(fd).st_size < end:  # a map past the end would fail (ValueError), or fault on use
                raise InvalidCheckpointError(f"{self.path}: tensor {name!r}: file shrank while being read")
            aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
            # MAP_POPULATE maps every page up front: one system call instead of a page
            # fault per 4 KiB, about a third of the cost of reading page-cached data.
            mm = mmap.mmap(fd, end - aligned, offset=aligned, prot=mmap.PROT_READ,
                           flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        # The array keeps `mm` alive; when the array is dropped the map is unmapped.
        return np.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin - aligned)

    def locate(self, name: str) -> tuple[str, int]:
        """(this file's path, the byte offset of the tensor's first element in it)."""
        return self._fspath, self._data_start + self._offsets[name][0]

    def get_array(self, name: str) -> np.ndarray:
        return self.read(name).reshape(self._infos[name].shape)
