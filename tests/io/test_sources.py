"""Resolving a checkpoint reference: files, sharded folders (with or without an index), index
paths; and refusing what is not safetensors (pickles are never unpickled)."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from factory import run_error

from ckptprobe.errors import CheckpointNotFoundError, InvalidCheckpointError
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors


def same_tensors(a, b):
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        assert a.info(name) == b.info(name)
        np.testing.assert_array_equal(a.get_array(name), b.get_array(name))


def test_sharded_folder_equals_single_file(tiny_pair):
    folder, single = open_source(str(tiny_pair.base_dir)), open_source(str(tiny_pair.base))
    assert len(list(tiny_pair.base_dir.glob("*.safetensors"))) == 2
    same_tensors(folder, single)
    assert folder.ref == str(tiny_pair.base_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(folder.read(name, 10, 100), single.get_array(name).reshape(-1)[10:100])


def test_index_path_given_directly(tiny_pair):
    index = tiny_pair.base_dir / "model.safetensors.index.json"
    same_tensors(open_source(str(index)), open_source(str(tiny_pair.base)))


def test_folder_without_index(tiny_pair, tmp_path):
    for shard in tiny_pair.base_dir.glob("*.safetensors"):
        shutil.copy(shard, tmp_path / shard.name)
    same_tensors(open_source(str(tmp_path)), open_source(str(tiny_pair.base)))


def test_model_safetensors_folder(tiny_pair, tmp_path):
    shutil.copy(tiny_pair.base, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    same_tensors(open_source(str(tmp_path)), open_source(str(tiny_pair.base)))


def test_hub_cache_layout_with_symlinked_shards(tiny_pair, tmp_path):
    """In the Hub cache, snapshots/<rev>/ holds symlinks into blobs/: they are not 'outside the folder'."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, shard in enumerate(sorted(tiny_pair.base_dir.iterdir())):
        shutil.copy(shard, blobs / f"blob{i}")
        (snap / shard.name).symlink_to(os.path.relpath(blobs / f"blob{i}", snap))
    same_tensors(open_source(str(snap)), open_source(str(tiny_pair.base)))


def test_tensor_in_two_files_is_refused(tmp_path, capsys):
    for name in ("a.safetensors", "b.safetensors"):
        write_safetensors(tmp_path / name, {"w": ("F32", np.zeros(2, np.float32))})
    with pytest.raises(InvalidCheckpointError):
        open_source(str(tmp_path))
    run_error(capsys, ["sparsity", str(tmp_path), str(tmp_path)], "'w'", "a.safetensors", "b.safetensors")


def index_folder(tmp_path, weight_map):
    write_safetensors(tmp_path / "s1.safetensors", {"w": ("F32", np.zeros(2, np.float32))})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


def test_index_errors(tmp_path, capsys):
    cases = {
        "missing shard": ({"w": "s1.safetensors", "v": "s2.safetensors"}, ["'s2.safetensors'", "does not exist"]),
        "parent dir": ({"w": "s1.safetensors", "v": "../s1.safetensors"}, ["'../s1.safetensors'", "outside"]),
        "absolute": ({"w": "s1.safetensors", "v": str(tmp_path / "s1.safetensors")}, ["outside"]),
        "wrong shard": ({"w": "s1.safetensors", "v": "s1.safetensors"}, ["'v'", "s1.safetensors", "does not hold it"]),
        "not a string": ({"w": ["s1.safetensors"]}, ["does not exist"]),
    }
    for case, (weight_map, words) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        index_folder(folder, weight_map)
        if case == "parent dir":  # the file it points to exists: only the path is wrong
            shutil.copy(folder / "s1.safetensors", tmp_path / "s1.safetensors")
        with pytest.raises((InvalidCheckpointError, CheckpointNotFoundError)):
            open_source(str(folder))
        lines = run_error(capsys, ["sparsity", str(folder), str(folder)], str(folder), *words)
        # the index given directly fails the same way
        assert run_error(capsys, ["sparsity", str(folder / "model.safetensors.index.json"), str(folder)]) == lines


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"metadata": {}}', '{"weight_map": [1]}'])
def test_malformed_index(tmp_path, capsys, content):
    write_safetensors(tmp_path / "s1.safetensors", {"w": ("F32", np.zeros(2, np.float32))})
    (tmp_path / "model.safetensors.index.json").write_text(content)
    run_error(capsys, ["sparsity", str(tmp_path), str(tmp_path)], "model.safetensors.index.json",
                   "not a safetensors index")


@pytest.mark.parametrize("ref", ["no/such/folder/here", "/no/such/file.safetensors", "./missing",
                                 "not a repo", "~/surely-missing-ckptprobe-dir"])
def test_missing_reference(tmp_path, capsys, ref):
    good = tmp_path / "g.safetensors"
    write_safetensors(good, {"w": ("F32", np.zeros(2, np.float32))})
    with pytest.raises(CheckpointNotFoundError):
        open_source(ref)
    run_error(capsys, ["sparsity", ref, str(good)], ref, "no such file or folder")
    run_error(capsys, ["sparsity", str(good), ref], ref, "no such file or folder")


@pytest.mark.parametrize("target", ["/no/such/file.safetensors", "name"])  # a dangling link, a link to itself
def test_broken_link_is_local_never_the_hub(tmp_path, capsys, monkeypatch, target):
    """`org/name` that is a broken symbolic link names a local file: said so, and no Hub request is made
    (HF_ENDPOINT points at a port that nothing serves: a request would fail with another message)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").symlink_to(target)
    good = tmp_path / "g.safetensors"
    write_safetensors(good, {"w": ("F32", np.zeros(2, np.float32))})
    with pytest.raises(CheckpointNotFoundError, match=f"^org/name: a broken symbolic link \\(to {target}\\)$"):
        open_source("org/name")
    run_error(capsys, ["sparsity", str(good), "org/name"], "org/name", "broken symbolic link")


def test_missing_entry_of_a_local_folder_is_local_never_the_hub(tmp_path, capsys, monkeypatch):
    """`run/step-3` where a local `run/` holds other steps (a gap in a brace range) is a missing local
    checkpoint, said so; `hf://` still names the Hub repo (HF_ENDPOINT points at nothing: its own error)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    good = tmp_path / "run" / "step-1.safetensors"
    write_safetensors(good, {"w": ("F32", np.zeros(2, np.float32))})
    run_error(capsys, ["sparsity", str(good), "run/step-3"], "run/step-3: no such file or folder in the local "
              "folder run", hint="hf://run/step-3")
    line = run_error(capsys, ["sparsity", str(good), "hf://run/step-3"])
    assert "local folder" not in line


def test_folder_without_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    run_error(capsys, ["sparsity", str(tmp_path), str(tmp_path)], str(tmp_path), "no *.safetensors")


class Trap:
    """Unpickling this creates `path`: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickles_are_refused_and_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    # The trap works: loading it does create the marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Trap(probe))).close()
    assert probe.exists()

    payload = pickle.dumps({"w": Trap(marker)})
    files = []
    for name in ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl"):
        (tmp_path / name).write_bytes(payload)
        files.append(tmp_path / name)
    torch.save({"w": Trap(marker)}, tmp_path / "torch_saved.pt")  # a real torch zip file
    files.append(tmp_path / "torch_saved.pt")
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"w": ("F32", np.zeros(2, np.float32))})
    for path in files:
        with pytest.raises(InvalidCheckpointError):
            open_source(str(path))
        run_error(capsys, ["sparsity", str(path), str(good)], str(path), "pickle", hint="safe_serialization")
        run_error(capsys, ["sparsity", str(good), str(path)], str(path), "pickle", hint="safe_serialization")
    assert not marker.exists()


def test_folder_with_only_pytorch_model_bin(tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": Trap(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(InvalidCheckpointError):
        open_source(str(folder))
    run_error(capsys, ["sparsity", str(folder), str(folder)], "pytorch_model.bin", "refusing to open a pickle",
                   hint="safe_serialization=True")
    assert not marker.exists()


def _mistral_like(tiny_pair, folder, sharded: bool) -> None:
    """A folder as Mistral's repos hold one: the transformers checkpoint (one file, or shards and their
    index), beside the same weights under Mistral's names in consolidated.safetensors, and a pickle."""
    folder.mkdir()
    if sharded:
        for p in tiny_pair.base_dir.iterdir():
            shutil.copy(p, folder / p.name)
    else:
        shutil.copy(tiny_pair.base, folder / "model.safetensors")
    base = open_source(str(tiny_pair.base))
    write_safetensors(folder / "consolidated.safetensors",
                      {n.replace("model.", "", 1): (base.info(n).dtype, base.read(n)) for n in base.keys()})
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")


@pytest.mark.parametrize("sharded", [False, True])
def test_the_model_files_of_a_folder_that_holds_other_weights(tiny_pair, tmp_path, monkeypatch, sharded):
    """transformers' choice (model.safetensors, else model.safetensors.index.json), locally and on the Hub:
    consolidated.safetensors would add every weight a second time under other names."""
    from hubserver import FakeHub, files_of, use_fake_hub

    _mistral_like(tiny_pair, tmp_path / "m", sharded)
    want = open_source(str(tiny_pair.base))
    same_tensors(open_source(str(tmp_path / "m")), want)
    with FakeHub() as fake:
        fake.add_repo("org/m", {"main": files_of(tmp_path / "m")})
        use_fake_hub(fake, tmp_path, monkeypatch)
        same_tensors(open_source("org/m"), want)


def test_several_indexes_none_standard_are_refused(tiny_pair, tmp_path, capsys, monkeypatch):
    from hubserver import FakeHub, files_of, use_fake_hub

    folder = tmp_path / "two"
    folder.mkdir()
    for p in tiny_pair.base_dir.iterdir():
        name = p.name.replace("model.safetensors.index.json", "a.safetensors.index.json")
        shutil.copy(p, folder / name)
    shutil.copy(folder / "a.safetensors.index.json", folder / "b.safetensors.index.json")
    run_error(capsys, ["sparsity", str(folder), str(folder)], str(folder), "2 safetensors indexes",
              "a.safetensors.index.json, b.safetensors.index.json", hint="keep one index")
    (folder / "b.safetensors.index.json").unlink()  # one index of any name is the model's
    same_tensors(open_source(str(folder)), open_source(str(tiny_pair.base)))
    shutil.copy(folder / "a.safetensors.index.json", folder / "b.safetensors.index.json")
    with FakeHub() as fake:
        fake.add_repo("org/two", {"main": files_of(folder)})
        use_fake_hub(fake, tmp_path, monkeypatch)
        run_error(capsys, ["sparsity", "org/two", "org/two"], "org/two", "2 safetensors indexes")
