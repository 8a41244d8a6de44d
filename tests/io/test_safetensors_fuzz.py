"""Fuzzing the safetensors reader: mutated headers and files either read or raise a ckptprobe error.

Each example starts from a valid file (several dtypes, a 0-d and a zero-element tensor,
metadata), mutates its header (structurally: a field replaced by any JSON value, a key
dropped or doubled, offsets moved, the length field changed) or its bytes (flipped,
truncated, inserted), then opens it and reads every tensor whole and in a range. The
only exceptions allowed are `CkptprobeError`s, and the Python allocations of open + read
stay within a small multiple of the file's size (tracemalloc), so no shape or offset can
make the reader allocate what the file does not hold.

The run is derandomized (a fixed seed) and bounded for CI; for a longer local run:

    CKPTPROBE_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_safetensors_fuzz.py
"""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptprobe.errors import CkptprobeError
from ckptprobe.io.sources import open_source

EXAMPLES = int(os.environ.get("CKPTPROBE_FUZZ_EXAMPLES", "600"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def valid_header_and_data() -> tuple[dict, bytes]:
    rng = np.random.default_rng(0)
    arrays = {"w": ("BF16", rng.integers(0, 1 << 16, (3, 4), dtype=np.uint16)),
              "b": ("F32", rng.standard_normal(5).astype(np.float32)),
              "s": ("F64", np.float64(2.5).reshape(())),
              "e": ("I64", np.zeros((0, 3), np.int64)),
              "m": ("BOOL", np.array([True, False, True]))}
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, x) in arrays.items():
        header[name] = {"dtype": dtype, "shape": list(x.shape), "data_offsets": [len(data), len(data) + x.nbytes]}
        data += x.tobytes()
    return header, data


HEADER, DATA = valid_header_and_data()
NAMES = [k for k in HEADER if k != "__metadata__"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=False) |
    st.sampled_from(["F32", "BF16", "F8_E4M3", "F17", "", "I64"]) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
dims = st.integers(-3, 40) | st.sampled_from([2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64 + 1]) | json_values


@st.composite
def mutated_header(draw) -> bytes:
    header = json.loads(json.dumps(HEADER))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NAMES))
        kind = draw(st.sampled_from(["field", "dim", "offset", "drop", "metadata", "junk", "swap"]))
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if kind == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
        elif kind == "dim" and isinstance(entry.get("shape"), list):
            shape = entry["shape"]
            if shape and draw(st.booleans()):
                shape[draw(st.integers(0, len(shape) - 1))] = draw(dims)
            else:
                shape.append(draw(dims))
        elif kind == "offset" and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]:
            entry["data_offsets"][draw(st.integers(0, len(entry["data_offsets"]) - 1))] = draw(
                st.integers(-2, len(DATA) + 16) | json_values)
        elif kind == "drop":
            del header[name]
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        elif kind == "junk":
            header[draw(st.text(max_size=6))] = draw(json_values)
        elif kind == "swap":
            other = draw(st.sampled_from(NAMES))
            if isinstance(header.get(other), dict):
                entry["data_offsets"], header[other]["data_offsets"] = header[other].get("data_offsets"), \
                    entry.get("data_offsets")
    body = json.dumps(header).encode()
    if draw(st.booleans()):  # a duplicate key, written by hand (json.dumps cannot)
        body = body[:-1] + b', "%s": %s}' % (draw(st.sampled_from(NAMES)).encode(), json.dumps(HEADER["b"]).encode())
    return body + b" " * draw(st.integers(0, 9))


@st.composite
def mutated_file(draw) -> bytes:
    body = draw(mutated_header()) if draw(st.booleans()) else json.dumps(HEADER).encode()
    length = len(body)
    if draw(st.integers(0, 3)) == 0:
        length = draw(st.integers(0, len(body) + 40) | st.sampled_from([2 ** 63, 2 ** 64 - 1, 100_000_001]))
    raw = bytearray(length.to_bytes(8, "little") + body + DATA)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[at:at + draw(st.integers(1, 8))]
    return bytes(raw)


def read_everything(path, size: int) -> None:
    """Open `path` and read each tensor whole and in a range; ckptprobe errors are fine, others are not."""
    tracemalloc.start()
    try:
        src = open_source(str(path))
        total = 0
        for name in src.keys():
            info = src.info(name)
            x = src.get_array(name)
            assert x.shape == info.shape and x.nbytes == info.nbytes
            total += x.nbytes + src.read(name, 1, 3).nbytes
        assert total <= 2 * size
    except CkptprobeError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # The header's Python objects and the bracket scan cost some dozens of bytes per header byte;
    # a tensor's data is at most the file. Anything near a shape's claimed size would be far above.
    assert peak < (1 << 20) + 64 * size, (peak, size)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory):
    """Where each example is written; the reader runs once on a valid and a bad file first, so that
    lazy imports (numpy's, re's) are not counted as the fuzzed file's allocations."""
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.safetensors"
    body = json.dumps(HEADER).encode()
    for raw in (len(body).to_bytes(8, "little") + body + DATA, b"\0" * 8 + b"{}", b"\2\0\0\0\0\0\0\0[]"):
        path.write_bytes(raw)
        read_everything(path, 1 << 20)
    return path


@FUZZ
@given(raw=mutated_file())
def test_fuzzed_files_read_or_raise_our_error(fuzz_path, raw):
    path = fuzz_path
    path.write_bytes(raw)
    read_everything(path, len(raw))


def test_the_unmutated_file_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    body = json.dumps(HEADER).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + DATA)
    src = open_source(str(path))
    assert src.keys() == NAMES and src.get_array("s") == 2.5 and src.get_array("e").shape == (0, 3)
