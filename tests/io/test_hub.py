"""Hub references, read through the real huggingface_hub client from a fake Hub on 127.0.0.1.

The fake (tests/hubserver.py) serves the tiny checkpoints of `tiny_pair` as repos and
counts every request and every byte, so the tests can check what a run fetched.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from factory import bump, one_line_error
from hubserver import FakeHub, commit_of, files_of, silent_endpoint, use_fake_hub

from ckptprobe.analysis.sparsity import sparsity
from ckptprobe.cli import main
from ckptprobe.errors import CheckpointNotFoundError
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors

TOKEN = "hf_FakeSecretToken0123456789"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pr_mask(tiny_pair):
    """The entries changed by the checkpoint at org/ft@refs/pr/1: every 7th entry of every tensor."""
    return {n: (np.arange(m.size) % 7 == 0).reshape(m.shape) for n, m in tiny_pair.changed.items()}


@pytest.fixture(scope="module")
def hub(tiny_pair, pr_mask, tmp_path_factory):
    base = open_source(str(tiny_pair.base))
    pr = {n: bump(base.get_array(n), pr_mask[n]) for n in base.keys()}
    pr_path = tmp_path_factory.mktemp("pr") / "pr.safetensors"
    write_safetensors(pr_path, {n: ("BF16", x) for n, x in pr.items()})
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    with FakeHub() as fake:
        fake.add_repo("org/base", {"main": files_of(tiny_pair.base), "v2": files_of(tiny_pair.base)})
        fake.add_repo("org/ft", {"main": files_of(tiny_pair.ft), "v2": files_of(tiny_pair.base),
                                 "refs/pr/1": files_of(pr_path)})
        fake.add_repo("org/base-sharded", {"main": files_of(tiny_pair.base_dir)})
        fake.add_repo("org/ft-sharded", {"main": files_of(tiny_pair.ft_dir)})
        fake.add_repo("org/gated", {"main": files_of(tiny_pair.ft)}, token=TOKEN)
        fake.add_repo("org/pickle", {"main": {"pytorch_model.bin": b"\x80\x04not a real pickle", "config.json": b"{}"}})
        fake.add_repo("org/nothing", {"main": {"README.md": b"# empty"}})
        fake.add_repo("org/truncated", {"main": {"model.safetensors": tiny_pair.base.read_bytes()[:30_000]}})
        fake.add_repo("org/tiny-file", {"main": {"model.safetensors": b"\x01\x00\x00"}})
        fake.add_repo("org/no-ranges", {"main": files_of(tiny_pair.ft)}, quirks=("no-ranges",))
        fake.add_repo("org/size-unknown", {"main": files_of(tiny_pair.ft)}, quirks=("size-unknown",))
        fake.add_repo("org/bad-index", {"main": {"model.safetensors.index.json": json.dumps(index).encode(),
                                                 "model-00001-of-00002.safetensors": tiny_pair.base.read_bytes()}})
        yield fake


@pytest.fixture
def hf(hub, tmp_path, monkeypatch):
    """Point the in-process client at the fake Hub, with an empty cache and no token anywhere."""
    return use_fake_hub(hub, tmp_path, monkeypatch)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sparsity_json(capsys, *args: str) -> dict:
    code, out, err = cli(capsys, "sparsity", *args, "-f", "json")
    assert code == 0, err
    data = json.loads(out)
    del data["base"], data["finetuned"]  # the references differ, nothing else may
    return data


def local_json(capsys, base: Path, ft: Path, *args: str) -> dict:
    return sparsity_json(capsys, str(base), str(ft), *args)


def header_bytes(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


# -- results equal local results -------------------------------------------------------------

def test_sparsity_over_hub_equals_local_single_and_sharded(hf, tiny_pair, capsys):
    assert sparsity_json(capsys, "org/base", "org/ft", "--by", "tensor") == \
        local_json(capsys, tiny_pair.base, tiny_pair.ft, "--by", "tensor")
    assert sparsity_json(capsys, "org/base-sharded", "hf://org/ft-sharded") == \
        local_json(capsys, tiny_pair.base_dir, tiny_pair.ft_dir)
    # and both equal the planted changes, entry for entry
    expected = {n: int(m.sum()) for n, m in tiny_pair.changed.items()}
    r = sparsity(open_source("org/base-sharded"), open_source("org/ft"))
    assert {t.name: t.counts.changed for t in r.tensors} == expected


def test_arrays_are_the_stored_bits(hf, tiny_pair):
    hub_src, local_src = open_source("org/ft-sharded"), open_source(str(tiny_pair.ft))
    assert sorted(hub_src.keys()) == sorted(local_src.keys())
    for name in local_src.keys():
        a, b = hub_src.get_array(name), local_src.get_array(name)
        assert a.dtype == b.dtype == np.uint16 and a.shape == b.shape and np.array_equal(a, b)
        assert hub_src.info(name) == local_src.info(name)
    assert np.array_equal(hub_src.read("lm_head.weight", 100, 164), local_src.read("lm_head.weight", 100, 164))
    assert hub_src.read("lm_head.weight", 5, 5).size == 0


# -- only the needed bytes move ----------------------------------------------------------------

def test_include_fetches_headers_and_selected_tensors_only(hf, tiny_pair, capsys):
    data = sparsity_json(capsys, "org/base", "org/ft", "--include", "*.layers.1.*", "--by", "tensor")
    names = [t["name"] for t in data["tensors"]]
    assert names and all(".layers.1." in n for n in names)
    expected = {n: int(m.sum()) for n, m in tiny_pair.changed.items() if ".layers.1." in n}
    assert {t["name"]: t["changed"] for t in data["tensors"]} == expected
    src = open_source(str(tiny_pair.base))
    selected = sum(src.info(n).nbytes for n in names)
    for repo, path in (("org/base", tiny_pair.base), ("org/ft", tiny_pair.ft)):
        raw = path.read_bytes()
        served = hf.bytes_served[(repo, "model.safetensors")]
        assert served == header_bytes(raw) + selected  # exactly: 8 + header JSON + the selected tensors
        assert served < 0.6 * len(raw)
        ranges = [r.range for r in hf.requests if r.path.startswith(f"/{repo}/resolve/")]
        assert ranges[:2] == ["bytes=0-7", f"bytes=8-{header_bytes(raw) - 1}"] and len(ranges) == 2 + len(names)
        print(f"{repo}: served {served} of {len(raw)} bytes (header {header_bytes(raw)}, tensors {selected})")


def test_one_request_per_window_whatever_the_read_buffer(hf, tiny_pair, capsys, monkeypatch):
    """Local files are read a small buffer at a time; a Hub source gets one request per window."""
    from ckptprobe.analysis import sparsity as module

    monkeypatch.setattr(module, "READ", 16)  # bytes: every tensor of the pair is larger
    data = sparsity_json(capsys, "org/base", "org/ft", "--by", "tensor")
    expected = {n: int(m.sum()) for n, m in tiny_pair.changed.items()}
    assert {t["name"]: t["changed"] for t in data["tensors"]} == expected
    src = open_source(str(tiny_pair.base))
    assert all(src.info(n).nbytes > 16 for n in expected)
    for repo in ("org/base", "org/ft"):
        ranges = [r.range for r in hf.requests if r.path.startswith(f"/{repo}/resolve/")]
        assert len(ranges) == 2 + len(data["tensors"])  # the header, then each tensor once


def test_consensus_reads_a_block_per_request(hf, tiny_pair, capsys, monkeypatch):
    """consensus reads local files a chunk at a time; from the Hub, a whole block per request."""
    from ckptprobe.analysis import mask_scan

    monkeypatch.setattr(mask_scan, "CHUNK", 64)  # entries: many chunks per tensor
    code, out, err = cli(capsys, "consensus", "org/base", "org/ft", "org/ft-sharded", "-f", "json", "--by", "tensor")
    assert code == 0, err
    data = json.loads(out)
    assert [t["changed"] for t in data["tensors"]] == [[int(tiny_pair.changed[t["name"]].sum())] * 2
                                                      for t in data["tensors"]]
    ranges = [r.range for r in hf.requests if r.path.startswith("/org/base/resolve/")]
    assert len(ranges) == 2 + len(data["tensors"])  # the header, then each tensor's one block


def test_lfs_redirects_keep_the_range(hf, tiny_pair, capsys, monkeypatch):
    monkeypatch.setattr(hf, "redirect", True)  # 302 to a storage URL, like the real Hub's LFS files
    expected = local_json(capsys, tiny_pair.base, tiny_pair.ft, "--include", "*.mlp.*")
    assert sparsity_json(capsys, "org/base", "org/gated", "--include", "*.mlp.*", "--token", TOKEN) == expected
    cdn = [r for r in hf.requests if r.path.startswith("/cdn/org/gated/")]
    assert cdn and all(r.range and r.authorization is None for r in cdn)  # the token stays with the Hub
    mlp = sum(open_source(str(tiny_pair.ft)).info(n).nbytes for n in tiny_pair.changed if ".mlp." in n)
    assert hf.bytes_served[("org/gated", "model.safetensors")] == header_bytes(tiny_pair.ft.read_bytes()) + mlp
    assert sparsity_json(capsys, "org/base", "org/gated", "--token", TOKEN, "--download") == \
        local_json(capsys, tiny_pair.base, tiny_pair.ft)


def test_include_on_sharded_repo(hf, tiny_pair, capsys):
    data = sparsity_json(capsys, "org/base-sharded", "org/ft-sharded", "--include", "model.norm.weight")
    assert data["total"]["numel"] == 32
    served = {k[1]: v for k, v in hf.bytes_served.items() if k[0] == "org/ft-sharded"}
    index = (tiny_pair.ft_dir / "model.safetensors.index.json").read_bytes()
    shard = json.loads(index)["weight_map"]["model.norm.weight"]
    expected = {"model.safetensors.index.json": len(index)}
    for p in sorted(tiny_pair.ft_dir.glob("*.safetensors")):
        expected[p.name] = header_bytes(p.read_bytes()) + (32 * 2 if p.name == shard else 0)
    assert served == expected


# -- revisions ---------------------------------------------------------------------------------

def test_revisions(hf, tiny_pair, pr_mask, capsys):
    assert sparsity_json(capsys, "org/base", "org/ft@v2")["total"]["changed"] == 0  # v2 holds the base
    assert sparsity_json(capsys, "org/base", "org/ft", "--revision", "v2")["total"]["changed"] == 0  # both at v2
    planted = sum(int(m.sum()) for m in pr_mask.values())
    assert sparsity_json(capsys, "org/base", "org/ft@refs/pr/1")["total"]["changed"] == planted
    sha = commit_of("org/ft", "refs/pr/1")
    assert sparsity_json(capsys, "org/base@main", f"hf://org/ft@{sha}")["total"]["changed"] == planted
    assert open_source("org/ft@refs/pr/1").commit == sha
    assert any("/org/ft/resolve/" + sha in r.path for r in hf.requests)  # reads are pinned to the commit
    assert any(r.path == "/api/models/org/ft/revision/refs%2Fpr%2F1" for r in hf.requests)


# -- download, then offline ------------------------------------------------------------------

def test_download_then_offline_makes_no_request(hf, tiny_pair, capsys, monkeypatch):
    import huggingface_hub.constants as c

    online = sparsity_json(capsys, "org/base-sharded", "org/ft@refs/pr/1", "--download")
    cache = Path(c.HF_HUB_CACHE)
    assert {p.name for p in (cache / "models--org--base-sharded" / "snapshots").glob("*/*")} == \
        {p.name for p in tiny_pair.base_dir.iterdir()}
    assert (cache / "models--org--ft" / "refs" / "refs" / "pr" / "1").read_text() == commit_of("org/ft", "refs/pr/1")
    assert hf.bytes_served[("org/base-sharded", "model-00001-of-00002.safetensors")] >= \
        (tiny_pair.base_dir / "model-00001-of-00002.safetensors").stat().st_size  # whole shards came down

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    hf.reset()
    assert sparsity_json(capsys, "org/base-sharded", "org/ft@refs/pr/1") == online
    assert hf.requests == []

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)  # online again: cached files are read from the cache
    hf.reset()
    assert sparsity_json(capsys, "org/base-sharded", "org/ft@refs/pr/1") == online
    assert sum(hf.bytes_served.values()) == 0


def test_offline_without_cache_is_one_line(hf, capsys, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    code, out, err = cli(capsys, "sparsity", "org/base", "org/ft")
    assert code == 1 and out == ""
    line = one_line_error(err)
    assert "org/base@main" in line and "not in the Hub cache" in line and "HF_HUB_OFFLINE=1" in line
    assert "--download" in err and hf.requests == []


def test_offline_with_partial_cache_names_the_missing_shard(hf, tiny_pair, capsys, monkeypatch):
    import huggingface_hub.constants as c
    from huggingface_hub import hf_hub_download

    shards = sorted(p.name for p in tiny_pair.ft_dir.glob("*.safetensors"))
    for name in ("model.safetensors.index.json", shards[0]):  # the index and one of two shards
        hf_hub_download("org/ft-sharded", name)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    code, _, err = cli(capsys, "sparsity", "org/ft-sharded", "org/ft-sharded")
    assert code == 1 and "shard model-0000" in one_line_error(err) and "not in the Hub cache" in err


@pytest.mark.parametrize("repo, words", [
    ("org/no-ranges", ["org/no-ranges@main: model.safetensors", "HTTP 200, not 206"]),
    ("org/size-unknown", ["org/size-unknown@main: model.safetensors", "without the file's size"]),
])
def test_download_gets_past_a_server_that_answers_ranges_badly(hf, tiny_pair, capsys, repo, words):
    """A server or proxy that answers byte ranges badly: range reads fail, pointing at --download, and
    --download then fetches the file whole after the header's first request, so it works."""
    code, out, err = cli(capsys, "sparsity", "org/base", repo)
    assert code == 1 and out == "" and all(w in one_line_error(err, hint="--download") for w in words)
    hf.reset()
    assert sparsity_json(capsys, "org/base", repo, "--download") == local_json(capsys, tiny_pair.base, tiny_pair.ft)
    assert {r.range for r in hf.requests if r.range and r.path.startswith(f"/{repo}/")} == {"bytes=0-7"}


def test_download_fetches_only_the_shards_a_run_reads(hf, tiny_pair, capsys):
    """--download with --include: headers by range request, then whole files only where a selected tensor is."""
    index = json.loads((tiny_pair.base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) == 2
    data = sparsity_json(capsys, "org/base-sharded", "org/ft-sharded", "--include", "lm_head.weight", "--download",
                         "--by", "tensor")
    assert [t["name"] for t in data["tensors"]] == ["lm_head.weight"]
    for repo in ("org/base-sharded", "org/ft-sharded"):
        whole = {r.path.rsplit("/", 1)[1] for r in hf.requests
                 if r.path.startswith(f"/{repo}/resolve/") and r.path.endswith(".safetensors") and not r.range}
        assert whole == {index["lm_head.weight"]}, (repo, whole)


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref, words", [
    ("org/missing", ["org/missing", "no such model repo"]),
    ("org/ft@nope", ["org/ft", "no revision 'nope'"]),
    ("org/nothing", ["org/nothing@main", "no *.safetensors"]),
    ("org/bad-index", ["org/bad-index@main", "model-00002-of-00002.safetensors", "not in the repo"]),
    ("org/pickle", ["org/pickle@main", "pickle", "pytorch_model.bin"]),
    ("org/truncated", ["org/truncated@main: model.safetensors", "runs past the end of the file"]),
    ("org/tiny-file", ["org/tiny-file@main: model.safetensors", "3 bytes, too short"]),
])
def test_errors_are_one_line(hf, capsys, ref, words):
    t0 = time.perf_counter()
    code, out, err = cli(capsys, "sparsity", ref, "org/base")
    assert code == 1 and out == "" and "Traceback" not in err
    line = one_line_error(err)
    assert all(w in line for w in words), line
    assert time.perf_counter() - t0 < 5
    if "pickle" in ref:
        assert "save_pretrained" in err  # the same hint as a local pickle file


def test_missing_file_names_it(hf):
    src = open_source("org/base")
    with pytest.raises(CheckpointNotFoundError, match=r"org/base@main: nope\.safetensors: no such file"):
        src._get("nope.safetensors", 0, 8)


def test_unreachable_endpoint_fails_fast(hf, capsys, monkeypatch):
    import huggingface_hub.constants as c

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(c, "ENDPOINT", dead)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    for extra in ([], ["--download"]):
        t0 = time.perf_counter()
        code, out, err = cli(capsys, "sparsity", "org/base", "org/ft", *extra)
        assert time.perf_counter() - t0 < 5
        assert code == 1 and out == ""
        assert f"cannot reach {dead}" in one_line_error(err) and "HF_HUB_OFFLINE=1" in err


def test_silent_endpoint_times_out(hf, capsys, monkeypatch):
    with silent_endpoint(monkeypatch) as silent:
        t0 = time.perf_counter()
        code, _, err = cli(capsys, "sparsity", "org/base", "org/ft")
        assert time.perf_counter() - t0 < 5
    assert code == 1 and f"{silent} did not answer within HF_HUB_DOWNLOAD_TIMEOUT=0.3 s" in one_line_error(err)


def test_gated_repo_needs_the_token_and_never_prints_it(hf, tiny_pair, capsys, monkeypatch):
    code, _, err = cli(capsys, "sparsity", "org/base", "org/gated")
    line = one_line_error(err)
    assert code == 1 and "org/gated@main" in line and "gated" in line and "--token" in err and "HF_TOKEN" in err

    code, out, err = cli(capsys, "sparsity", "org/base", "org/gated", "--token", "hf_WrongToken999")
    assert code == 1 and "no access" in one_line_error(err) and "hf_WrongToken999" not in out + err

    expected = local_json(capsys, tiny_pair.base, tiny_pair.ft)
    assert sparsity_json(capsys, "org/base", "org/gated", "--token", TOKEN) == expected
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, err = cli(capsys, "sparsity", "org/base", "org/gated", "--format", "json")
    assert code == 0 and TOKEN not in out + err
    assert any(r.authorization == f"Bearer {TOKEN}" for r in hf.requests)


# -- the real environment-variable path --------------------------------------------------------

def test_subprocess_with_hf_endpoint(hub, tiny_pair, tmp_path, capsys):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": TOKEN}
    hub.reset()
    run = subprocess.run([sys.executable, "-m", "ckptprobe", "sparsity", "org/base", "org/gated",
                          "--include", "*.mlp.*", "-f", "json"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    del data["base"], data["finetuned"]
    assert data == local_json(capsys, tiny_pair.base, tiny_pair.ft, "--include", "*.mlp.*")
    assert TOKEN not in run.stdout + run.stderr
    assert hub.bytes_served[("org/gated", "model.safetensors")] < tiny_pair.ft.stat().st_size
    assert not list(tmp_path.rglob("*.safetensors"))  # range reads put nothing into the cache
