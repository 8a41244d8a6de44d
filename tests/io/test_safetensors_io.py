"""Reading and writing .safetensors: round trips against the `safetensors` library, element
ranges, and malformed files (each a one-line `Error:` naming the file, exit code 1)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from factory import run_error
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

from ckptprobe.errors import InvalidCheckpointError
from ckptprobe.io._safetensors import READ_SLACK, SMALL_READ, SafetensorsFile
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import atomic_write, write_safetensors

# safetensors dtype -> numpy dtype, for the dtypes numpy has.
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
                "U8": np.uint8, "BOOL": np.bool_}
# dtypes numpy lacks, stored as raw bits of this width.
TORCH_DTYPES = {"BF16": (torch.bfloat16, torch.int16, np.uint16), "F8_E4M3": (torch.float8_e4m3fn, torch.uint8, np.uint8),
                "F8_E5M2": (torch.float8_e5m2, torch.uint8, np.uint8)}
SHAPES = [(7, 5), (3,), (), (0, 4), (2, 3, 4)]


def numpy_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for dtype, np_dtype in NUMPY_DTYPES.items():
        for i, shape in enumerate(SHAPES):
            if np_dtype == np.bool_:
                x = rng.random(shape) < 0.5
            elif np.issubdtype(np_dtype, np.integer):
                info = np.iinfo(np_dtype)
                x = rng.integers(info.min, info.max, shape, dtype=np_dtype, endpoint=True)
            else:
                x = (rng.standard_normal(shape) * 100).astype(np_dtype)
            out[f"t.{dtype}.{i}"] = np.asarray(x, np_dtype)
    return out


def test_numpy_written_by_library_read_by_us(tmp_path):
    tensors = numpy_tensors()
    path = tmp_path / "lib.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "np", "k": "v"})
    f = SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(tensors)
    assert f.metadata == {"format": "np", "k": "v"}
    for name, x in tensors.items():
        info = f.info(name)
        assert info.dtype == name.split(".")[1]
        assert info.shape == x.shape and info.numel == x.size and info.nbytes == x.nbytes
        got = f.get_array(name)
        assert got.dtype == x.dtype and got.shape == x.shape
        np.testing.assert_array_equal(got, x)


def test_numpy_written_by_us_read_by_library(tmp_path):
    tensors = numpy_tensors(1)
    path = tmp_path / "ours.safetensors"
    dtype_of = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}
    write_safetensors(path, {n: (dtype_of[x.dtype], x) for n, x in tensors.items()}, {"who": "ckptprobe"})
    back = safetensors.numpy.load_file(str(path))
    assert sorted(back) == sorted(tensors)
    for name, x in tensors.items():
        assert back[name].dtype == x.dtype and back[name].shape == x.shape
        np.testing.assert_array_equal(back[name], x)
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"who": "ckptprobe"}


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_torch_only_dtypes_round_trip(tmp_path, dtype):
    """BF16/FP8 have no numpy type: we hand out (and take) their raw bits."""
    torch_dtype, bits_dtype, np_bits = TORCH_DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(33, 17, generator=g) * 3).to(torch_dtype)
    lib = tmp_path / "lib.safetensors"
    safetensors.torch.save_file({"w": x, "s": x[0, 0].clone()}, str(lib))
    f = SafetensorsFile(lib)
    assert f.info("w").dtype == dtype and f.info("s").shape == ()
    assert f.info("w").nbytes == x.numel() * x.element_size() and f.info("w").itemsize == x.element_size()
    bits = x.view(bits_dtype).numpy().view(np_bits)
    np.testing.assert_array_equal(f.get_array("w"), bits)
    assert f.get_array("s").shape == () and f.get_array("s") == bits[0, 0]

    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, {"w": (dtype, bits)})
    back = safetensors.torch.load_file(str(ours))["w"]
    assert back.dtype == torch_dtype
    assert torch.equal(back.view(bits_dtype), x.view(bits_dtype))


def test_write_refuses_wrong_storage_dtype(tmp_path):
    with pytest.raises(TypeError, match="float32 cannot be stored as BF16"):
        write_safetensors(tmp_path / "x.safetensors", {"w": ("BF16", np.zeros(3, np.float32))})
    assert not list(tmp_path.iterdir())


def test_read_ranges(tmp_path):
    # Tensors at offsets that are not multiples of the mmap granularity, spanning many pages.
    rng = np.random.default_rng(2)
    tensors = {"a": ("F32", rng.standard_normal(3).astype(np.float32)),
               "b": ("BF16", rng.integers(0, 1 << 16, 300_001, dtype=np.uint16)),
               "c": ("F64", rng.standard_normal((123, 457)))}
    path = tmp_path / "r.safetensors"
    write_safetensors(path, tensors)
    f = SafetensorsFile(path)
    for name, (_, x) in tensors.items():
        flat = x.reshape(-1)
        n = flat.size
        cases = [(0, None), (0, n), (1, n - 1), (n - 1, n), (5, 5), (7, 3), (0, n + 1000), (n, None)]
        cases += [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(20)]
        big, small = np.zeros(flat.nbytes + 8, np.uint8), np.zeros(4, np.uint8)
        for start, stop in cases:
            got = f.read(name, start, stop)
            assert got.dtype == x.dtype
            np.testing.assert_array_equal(got, flat[start:stop])
            into = f.read(name, start, stop, out=big)  # copied into the caller's buffer
            np.testing.assert_array_equal(into, flat[start:stop])
            assert into.dtype == x.dtype and (into.size == 0 or np.shares_memory(into, big))
            for unfit in (small, big[::2], big.view(np.uint16)):  # too small, not contiguous, not bytes: ignored
                np.testing.assert_array_equal(f.read(name, start, stop, out=unfit), flat[start:stop])
        assert not f.read(name, 0, 2).flags.writeable  # a view of the file: read-only


def test_read_into_a_buffer_with_slack_keeps_the_files_offset_within_a_page(tmp_path):
    # A range above SMALL_READ lands where its address and its file offset agree modulo a page (the
    # kernel's fast copy), for buffers at every alignment; without the slack it lands at the buffer's start.
    rng = np.random.default_rng(5)
    x = rng.integers(0, 1 << 16, 50_001, dtype=np.uint16)
    path = tmp_path / "s.safetensors"
    write_safetensors(path, {"pad": ("U8", np.zeros(13, np.uint8)), "w": ("BF16", x)})
    f = SafetensorsFile(path)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    begin = 8 + header + 13  # the file offset of "w"'s first byte: the header, then "pad"
    raw = np.zeros(x.nbytes + 3 * READ_SLACK, np.uint8)
    for start, stop in [(0, None), (1, 40_000), (2_049, 2_050), (50_000, 50_001)]:
        want = x[start:stop]
        for skew in (0, 1, 16, 2_048, 4_095):
            page = -raw.ctypes.data % READ_SLACK
            out = raw[page + skew:page + skew + want.nbytes + READ_SLACK]
            got = f.read("w", start, stop, out=out)
            np.testing.assert_array_equal(got, want)
            assert np.shares_memory(got, out)
            if want.nbytes > SMALL_READ:  # a small copy is cheap wherever it lands: at the buffer's start
                assert (got.ctypes.data - (begin + 2 * start)) % READ_SLACK == 0
            else:
                assert got.ctypes.data == out.ctypes.data
            exact = f.read("w", start, stop, out=out[:want.nbytes])
            np.testing.assert_array_equal(exact, want)
            assert exact.ctypes.data == out.ctypes.data


def test_read_into_a_buffer_from_a_file_cut_short(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_safetensors(path, {"w": ("F32", np.arange(100_000, dtype=np.float32))})
    f = SafetensorsFile(path)
    os.truncate(path, path.stat().st_size - 1000)
    with pytest.raises(InvalidCheckpointError, match=r"cut\.safetensors: tensor 'w': file shrank"):
        f.read("w", 0, None, out=np.empty(400_000, np.uint8))
    for start in (0, 99_000):  # mapped (a whole tensor), and copied (a few pages)
        with pytest.raises(InvalidCheckpointError, match=r"cut\.safetensors: tensor 'w': file shrank"):
            f.read("w", start)


def test_metadata_and_alignment_of_written_file(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"x": ("U8", np.arange(3, dtype=np.uint8))}, {"a": "1"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0  # data starts 8-aligned, as the safetensors library writes it
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"a": "1"}
    assert header["x"] == {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}
    assert raw[8 + n:] == bytes([0, 1, 2])


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half of the new cont")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"  # the previous file is untouched
    assert os.listdir(tmp_path) == ["out.json"]  # and no temporary file is left
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]


# ---- malformed files: one line `Error: <file>: ...`, exit code 1, no traceback ----

def raw_file(path, header, data: bytes = b"", length: int | None = None):
    """A file with the given header (dict -> JSON, or bytes) and data; `length` overrides the size field."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(body) if length is None else length).to_bytes(8, "little") + body + data)
    return path


def valid(tmp_path):
    path = tmp_path / "good.safetensors"
    write_safetensors(path, {"w": ("F32", np.arange(8, dtype=np.float32))})
    return path


def bad_files(tmp_path):
    """name -> (path, words the error must contain)."""
    good = valid(tmp_path).read_bytes()
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(good[:-5])
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(good[:5])
    four = b"\0" * 16
    f32 = {"dtype": "F32", "shape": [4]}
    return {
        "truncated": (trunc, ["'w'", "past the end", "truncated"]),
        "too short": (tiny, ["too short"]),
        "not json": (raw_file(tmp_path / "notjson.safetensors", b"{this is not json"), ["not valid JSON"]),
        "not an object": (raw_file(tmp_path / "list.safetensors", [1, 2]), ["not a JSON object"]),
        "huge header": (raw_file(tmp_path / "huge.safetensors", {}, length=1 << 40), ["header claims"]),
        "header past end": (raw_file(tmp_path / "short.safetensors", {}, length=1000), ["header runs past the end"]),
        "overlap": (raw_file(tmp_path / "overlap.safetensors",
                             {"a": {**f32, "data_offsets": [0, 16]}, "b": {**f32, "data_offsets": [8, 24]}},
                             b"\0" * 24), ["'a'", "'b'", "overlap"]),
        "past end": (raw_file(tmp_path / "pastend.safetensors", {"a": {**f32, "data_offsets": [0, 16]}}, b"\0" * 8),
                     ["'a'", "past the end"]),
        "wrong size": (raw_file(tmp_path / "size.safetensors", {"a": {**f32, "data_offsets": [0, 12]}}, four),
                       ["'a'", "do not hold 4 F32 values (16 bytes)"]),
        "bad dtype": (raw_file(tmp_path / "dtype.safetensors",
                               {"a": {"dtype": "F17", "shape": [4], "data_offsets": [0, 16]}}, four),
                      ["'a'", "dtype 'F17'"]),
        "negative dim": (raw_file(tmp_path / "neg.safetensors",
                                  {"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, four),
                         ["'a'", "malformed"]),
        "entry not an object": (raw_file(tmp_path / "entry.safetensors", {"a": "F32"}, four), ["'a'", "malformed"]),
        "bad metadata": (raw_file(tmp_path / "meta.safetensors", {"__metadata__": [1]}), ["__metadata__"]),
    }


@pytest.mark.parametrize("case", ["truncated", "too short", "not json", "not an object", "huge header",
                                  "header past end", "overlap", "past end", "wrong size", "bad dtype",
                                  "negative dim", "entry not an object", "bad metadata"])
def test_malformed_file_one_line_error(tmp_path, capsys, case):
    path, words = bad_files(tmp_path)[case]
    good = valid(tmp_path)
    with pytest.raises(InvalidCheckpointError):
        open_source(str(path))
    # as the base and as the fine-tune: the message names the bad file either way
    run_error(capsys, ["sparsity", str(path), str(good)], str(path), *words)
    run_error(capsys, ["sparsity", str(good), str(path)], str(path), *words)


def test_unreadable_file(tmp_path, capsys, monkeypatch):
    path = valid(tmp_path)
    real_open = open

    def refuse(file, *args, **kwargs):  # permissions cannot stop root, so the OS's refusal is simulated
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    run_error(capsys, ["sparsity", str(path), str(path)], str(path), "cannot read")
