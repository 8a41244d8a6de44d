"""Subfolders and series on the Hub (and locally): `org/name@rev:folder`, `org/name@step-*`,
`org/name:global_step_*/actor/huggingface`, `{a,b}` braces; and Hub replies the client cannot use.

The fake Hub (tests/hubserver.py) serves a checkpoint series three ways: as branches
(`org/steps`), as subfolders of one revision (`org/verl`, laid out as verl saves it) and as
local folders; every way must give the same numbers as the local files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from factory import bump, one_line_error, run_error
from hubserver import FakeHub, files_of, silent_endpoint, use_fake_hub

from ckptprobe.cli import main
from ckptprobe.errors import CheckpointNotFoundError, DeviceError
from ckptprobe.io.series import expand_braces, expand_refs, natural_key
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors

STEPS = (20, 100, 1000)  # lexicographic order would put 1000 before 20


@pytest.fixture(scope="module")
def series(tiny_pair, tmp_path_factory) -> dict[int, Path]:
    """Local checkpoints step-20/100/1000: each changes a growing share of the base's entries."""
    root = tmp_path_factory.mktemp("series")
    base = open_source(str(tiny_pair.base))
    out = {}
    for i, step in enumerate(STEPS):
        rng = np.random.default_rng(step)
        folder = root / f"step-{step}"
        folder.mkdir()
        write_safetensors(folder / "model.safetensors",
                          {n: ("BF16", bump(base.get_array(n), rng.random(base.info(n).shape) < 0.1 * (i + 1)))
                           for n in base.keys()})
        out[step] = folder
    return out


@pytest.fixture(scope="module")
def hub(tiny_pair, series):
    base = files_of(tiny_pair.base)
    verl = {"README.md": b"# a verl run"}
    for step, folder in series.items():
        verl[f"global_step_{step}/actor/huggingface/model.safetensors"] = (folder / "model.safetensors").read_bytes()
        verl[f"global_step_{step}/actor/huggingface/config.json"] = b"{}"
        verl[f"global_step_{step}/critic/huggingface/model.safetensors"] = base["model.safetensors"]
    verl["global_step_50/actor/optim_state.pt"] = b"not a checkpoint"  # no safetensors: not a match
    with FakeHub() as fake:
        fake.add_repo("org/steps", {"main": base, "v1": base,
                                    **{f"step-{s}": files_of(f / "model.safetensors") for s, f in series.items()}},
                      tags=("v1",))
        fake.add_repo("org/verl", {"main": verl})
        fake.add_repo("org/no-rfilename", {"main": base}, quirks=("no-rfilename",))
        fake.add_repo("org/size-unknown", {"main": base}, quirks=("size-unknown",))
        yield fake


@pytest.fixture
def hf(hub, tmp_path, monkeypatch):
    return use_fake_hub(hub, tmp_path, monkeypatch)


def drift_json(capsys, *args) -> dict:
    assert main(["drift", *args, "-f", "json"]) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    del data["base"], data["checkpoints"]
    for s in [*data.get("surges", []), *data["total"], *(r for rows in data["groups"].values() for r in rows)]:
        del s["checkpoint"]
    return data


# -- names --------------------------------------------------------------------------------------

def test_natural_order_and_braces():
    assert sorted(["step-1000", "step-100", "step-20", "step-200"], key=natural_key) == \
        ["step-20", "step-100", "step-200", "step-1000"]
    assert expand_braces("org/n@{step-200,step-100}") == ["org/n@step-200", "org/n@step-100"]  # as written
    assert expand_braces("run/step-{0100..0300..100}/x") == ["run/step-0100/x", "run/step-0200/x", "run/step-0300/x"]
    assert expand_braces("{3..1}{a,b}") == ["3a", "3b", "2a", "2b", "1a", "1b"]
    assert expand_braces("no{braces}here") == ["no{braces}here"]


def test_revision_glob_matches_branches_and_tags_in_natural_order(hf):
    assert expand_refs(["org/steps@step-*"]) == [f"org/steps@step-{s}" for s in STEPS]
    assert expand_refs(["hf://org/steps@v?"]) == ["org/steps@v1"]  # tags too
    assert expand_refs(["org/steps@{step-1000,step-20}"]) == ["org/steps@step-1000", "org/steps@step-20"]
    assert any(r.path == "/api/models/org/steps/refs" for r in hf.requests)


def test_subfolder_glob_matches_folders_holding_checkpoints(hf):
    want = [f"org/verl:global_step_{s}/actor/huggingface" for s in STEPS]
    assert expand_refs(["org/verl:global_step_*/actor/huggingface"]) == want
    assert expand_refs(["org/verl@main:global_step_*/*/huggingface"]) == [
        f"org/verl@main:global_step_{s}/{role}/huggingface" for s in STEPS for role in ("actor", "critic")]


def test_series_on_the_hub_equals_the_local_series(hf, tiny_pair, series, capsys):
    local = drift_json(capsys, str(tiny_pair.base), *(str(series[s]) for s in STEPS))
    assert drift_json(capsys, "org/steps", "org/steps@step-*") == local
    assert drift_json(capsys, "org/steps@v1", "org/verl:global_step_*/actor/huggingface") == local
    # a local glob, quoted so that ckptprobe expands it: natural order, not the shell's
    assert drift_json(capsys, str(tiny_pair.base), str(next(iter(series.values())).parent / "step-*")) == local
    assert main(["drift", "org/steps", "org/steps@step-*", "-f", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"] == [f"org/steps@step-{s}" for s in STEPS]


def test_subfolder_reference_reads_ranges_only(hf, tiny_pair, series, capsys):
    ref = "org/verl@main:global_step_100/actor/huggingface"
    src = open_source(ref)
    assert src.ref == ref and src.commit and sorted(src.keys()) == sorted(open_source(str(series[100])).keys())
    name = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(src.get_array(name), open_source(str(series[100])).get_array(name))
    size = len(hf.repos["org/verl"].revisions["main"]["global_step_100/actor/huggingface/model.safetensors"])
    assert 0 < hf.bytes_served[("org/verl", "global_step_100/actor/huggingface/model.safetensors")] < size / 2
    assert main(["sparsity", str(tiny_pair.base), ref, "-f", "json"]) == 0
    hub_total = json.loads(capsys.readouterr().out)["total"]
    assert main(["sparsity", str(tiny_pair.base), str(series[100]), "-f", "json"]) == 0
    assert hub_total == json.loads(capsys.readouterr().out)["total"]


def test_subfolder_download_then_offline(hf, series, monkeypatch):
    import huggingface_hub.constants as c

    ref = "org/verl:global_step_20/actor/huggingface"
    name = "model.embed_tokens.weight"
    online = open_source(ref, download=True).get_array(name)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    hf.reset()
    np.testing.assert_array_equal(open_source(ref).get_array(name), online)
    assert hf.requests == []
    np.testing.assert_array_equal(online, open_source(str(series[20])).get_array(name))


def test_paginated_tree_lists_every_folder(hf, monkeypatch):
    monkeypatch.setattr(hf, "tree_page_size", 2)  # the real Hub pages by 1000 entries
    assert expand_refs(["org/verl:global_step_*/*/huggingface"]) == [
        f"org/verl:global_step_{s}/{role}/huggingface" for s in STEPS for role in ("actor", "critic")]
    assert sum(r.path.startswith("/api/models/org/verl/tree/main?") for r in hf.requests) > 5


@pytest.mark.parametrize("pattern, label", [("org/steps@step-*", "org/steps@step-*"),
                                            ("org/verl:global_step_*/actor", "org/verl@main:global_step_*/actor")])
def test_series_on_silent_endpoint_times_out(hf, capsys, monkeypatch, pattern, label):
    with silent_endpoint(monkeypatch) as silent:
        t0 = time.perf_counter()
        run_error(capsys, ["drift", "org/steps", pattern], label,
                  f"{silent} did not answer within HF_HUB_DOWNLOAD_TIMEOUT=0.3 s")
        assert time.perf_counter() - t0 < 5


def test_series_download_then_offline(hf, capsys, monkeypatch):
    """Patterns expand from the Hub cache when HF_HUB_OFFLINE=1: the same output, no request."""
    import huggingface_hub.constants as c

    def run(*args):
        assert main([*args, "-f", "json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    runs = [("drift", "org/steps", "org/steps@step-*"),
            ("drift", "org/steps@v1", "org/verl:global_step_*/actor/huggingface")]
    online = [run(*args, "--download") for args in runs]
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    hf.reset()
    assert [run(*args) for args in runs] == online
    assert online[0]["checkpoints"] == [f"org/steps@step-{s}" for s in STEPS]
    assert hf.requests == []
    hint = "run once online with --download"
    run_error(capsys, ["drift", "org/steps", "org/steps@nope-*"], "org/steps@nope-*", "Hub cache",
              "no revision", "'nope-*'", hint=hint)
    run_error(capsys, ["drift", "org/steps", "org/verl:global_step_*/critic/huggingface"],  # on the Hub, not cached
              "org/verl@main", "Hub cache", "no folder", "'global_step_*/critic/huggingface'", hint=hint)
    assert hf.requests == []


@pytest.mark.parametrize("args, code, words", [
    (["drift", "org/steps", "org/steps@nope-*"], 1, ["org/steps@nope-*", "no branch or tag", "'nope-*'"]),
    (["drift", "org/steps", "org/verl:global_step_*/nothing"], 1, ["no folder holding *.safetensors", "nothing"]),
    (["drift", "org/steps", "org/missing@step-*"], 1, ["org/missing", "no such model repo"]),
    (["sparsity", "org/steps", "org/steps@step-*"], 2, ["org/steps@step-*", "pattern"]),
    (["sparsity", "org/steps", "org/verl"], 1, ["org/verl@main", "holds no *.safetensors"]),
    (["sparsity", "org/steps", "org/verl:global_step_7"], 1, ["org/verl@main:global_step_7", "no folder"]),
    (["sparsity", "org/steps", "org/verl:../x"], 1, ["'../x'", "not a path inside the repo"]),
    (["sparsity", "org/steps", "org/no-rfilename"], 1, ["org/no-rfilename@main", "model-info", "KeyError"]),
    (["sparsity", "org/steps", "org/size-unknown"], 1, ["org/size-unknown@main: model.safetensors",
                                                         "without the file's size", "/*"]),
    (["drift", "org/steps", "./no/such/step-*"], 1, ["./no/such/step-*", "matches no file or folder"]),
])
def test_errors_are_one_line(hf, capsys, tmp_path, args, code, words):
    out = tmp_path / "out.json"
    run_error(capsys, [*args, "-o", str(out)], *words, code=code)
    assert not out.exists()


def test_root_without_checkpoint_hints_at_subfolders(hf, capsys):
    assert main(["sparsity", "org/steps", "org/verl"]) == 1
    err = capsys.readouterr().err
    one_line_error(err, hint="org/verl@main:FOLDER")
    assert "global_step_100" in err


def test_path_objects_and_missing_cuda(tiny_pair, tmp_path, monkeypatch):
    src = open_source(tiny_pair.base)  # a Path, not a str
    assert src.ref == str(tiny_pair.base) and len(src.keys()) == len(open_source(str(tiny_pair.base)).keys())
    with pytest.raises(CheckpointNotFoundError):
        open_source(tmp_path / "missing")
    import torch

    from ckptprobe.io.maskfile import load_masks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    with pytest.raises(DeviceError, match="torch sees no CUDA device") as e:
        load_masks(tmp_path / "any.safetensors", device="cuda")
    assert "\n" not in str(e.value)
