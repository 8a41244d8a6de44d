"""Inputs that are not what they claim, and outputs aimed at inputs: one line, an exit code, nothing
destroyed, never a hang. Cases that could hang run in a child process under a timeout."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from factory import one_line_error, run_error, save, tiny_weights

from ckptprobe.cli import main
from ckptprobe.io.writer import write_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_child(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.run([sys.executable, "-m", "ckptprobe", *map(str, args)], text=True, timeout=60, cwd=REPO,
                          env=env, **kw)


def test_a_fifo_or_a_device_in_a_checkpoint_folder_is_refused(tiny_pair, tmp_path):
    fifo_dir, dev_index = tmp_path / "fifo", tmp_path / "devindex"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "model.safetensors")  # an open() for reading would wait for a writer forever
    dev_index.mkdir()
    os.symlink("/dev/zero", dev_index / "model.safetensors.index.json")  # a read would never end
    for folder, culprit in ((fifo_dir, "model.safetensors"), (dev_index, "model.safetensors.index.json")):
        r = run_child("sparsity", tiny_pair.base, folder)
        assert r.returncode == 1 and r.stdout == ""
        one_line_error(r.stderr, f"{folder / culprit}: not a regular file")
    r = run_child("sparsity", tiny_pair.base, "/dev/zero")
    assert r.returncode == 1
    one_line_error(r.stderr, "/dev/zero: not a regular file or folder")


def test_odd_references_and_indexes(tiny_pair, tmp_path, capsys):
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    run_error(capsys, ["sparsity", str(tiny_pair.base), str(deep)], "not a safetensors index")
    run_error(capsys, ["sparsity", str(tiny_pair.base), "~no-such-user-here/x"], "'~no-such-user-here': no such user")
    # a header name that is half a UTF-16 surrogate pair is not text: refused as the JSON standard says
    bad = tmp_path / "surrogate.safetensors"
    header = json.dumps({"w\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    run_error(capsys, ["sparsity", str(bad), str(bad)], "unpaired surrogate")


def test_output_over_an_input_is_refused(tiny_pair, tmp_path, capsys):
    base, ft = save(tmp_path / "base" / "model.safetensors", tiny_weights(0)), tmp_path / "ft.safetensors"
    ft.write_bytes(tiny_pair.ft.read_bytes())
    before = base.read_bytes(), ft.read_bytes()
    run_error(capsys, ["sparsity", str(base.parent), str(ft), "-f", "json", "-o", str(ft)],
              f"{ft}: an output of this run, and also one of its inputs", code=2)
    run_error(capsys, ["masks", "build", str(base.parent), "--kind", "update", "--from", str(ft), "--vectors", "train",
                       "-o", str(base)], f"{base}: an output of this run, and also one of its inputs", code=2)
    link = tmp_path / "link.json"
    os.symlink(ft, link)  # through a symlink too
    run_error(capsys, ["sparsity", str(base.parent), str(ft), "-f", "json", "-o", str(link)], "refusing to write over",
              code=2)
    assert (base.read_bytes(), ft.read_bytes()) == before
    # the same command writes a new file, and a file it did not read
    assert main(["sparsity", str(base.parent), str(ft), "-o", str(tmp_path / "out.json")]) == 0


def test_closed_standard_streams(tiny_pair, tmp_path):
    out = tmp_path / "r.json"
    r = run_child("sparsity", tiny_pair.base, tiny_pair.ft, "-o", out, stdout=None, stderr=None,
                  preexec_fn=lambda: (os.close(1), os.close(2)))
    assert r.returncode == 0 and json.loads(out.read_text())["command"] == "sparsity"
    r = run_child("--version", stderr=subprocess.DEVNULL, stdout=None, preexec_fn=lambda: os.close(1))
    assert r.returncode == 0


@pytest.mark.parametrize("args, needle", [
    (["sparsity", "{base}", "{ft}", "-m", "eta", "--eta", "nan"], "--eta: must be a finite number >= 0, got nan"),
    (["drift", "{base}", "{ft}", "--z", "nan"], "--z: must be a finite number >= 0, got nan"),
    (["drift", "{base}", "{dir}/step-{{1..99999999999}}"], "more than the 10,000 checkpoints a pattern may name"),
    (["scramble", "{base}", "-o", "{dir}/s", "--seed", "1", "--layers", "0-99999999999999"], "past any model's last"),
    (["scramble", "{base}", "-o", "{dir}/s", "--seed", "-1"], "--seed: must be >= 0, got -1"),
])
def test_values_no_run_could_use(tiny_pair, tmp_path, capsys, args, needle):
    args = [a.format(base=tiny_pair.base, ft=tiny_pair.ft, dir=tmp_path) for a in args]
    assert main(args) == 2
    one_line_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "s").exists()


def test_a_run_that_holds_no_weight_where_the_base_does(tmp_path, capsys):
    w = tiny_weights(0)
    base = save(tmp_path / "base.safetensors", w, "F32")
    name = next(iter(w))
    run = tmp_path / "run.safetensors"
    write_safetensors(run, {n: ("BOOL", np.ones(x.shape, bool)) if n == name else ("F32", x) for n, x in w.items()})
    run_error(capsys, ["masks", "build", str(base), "--kind", "update", "--from", str(run), "--vectors", "train",
                       "-o", str(tmp_path / "m.safetensors")], f"{name} is BOOL, not a weight as in the base (F32)")
    assert not (tmp_path / "m.safetensors").exists()


def test_tensors_without_entries(tmp_path, capsys):
    # (64, 0) and (0, 0) weights: counted as empty by consensus, left out of a coarse export's units
    rng = np.random.default_rng(0)
    w = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
         "model.layers.0.mlp.down_proj.weight": np.zeros((64, 0), np.float32),
         "model.layers.0.mlp.gate_proj.weight": np.zeros((0, 0), np.float32)}
    paths = [save(tmp_path / f"{i}.safetensors", {n: x + i for n, x in w.items()}) for i in range(3)]
    assert main(["consensus", *map(str, paths), "-f", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["numel"] == 16 * 8
    assert main(["masks", "build", str(paths[0]), "--kind", "update", "--from", str(paths[1]), "--vectors", "train",
                 "-o", str(tmp_path / "m.safetensors")]) == 0
    assert main(["masks", "export", str(tmp_path / "m.safetensors"), "--to", "axolotl", "--budget", "0.5"]) == 0
    assert "up_proj" in capsys.readouterr().out


def test_a_mask_file_whose_metadata_lies(tmp_path, capsys):
    from safetensors.numpy import save_file

    for shape, fingerprint, needle in (([1 << 32, 1 << 32], None, "entries"), ([1 << 70], None, "entries"),
                                       ([8, 8], 5, "malformed metadata entry"),
                                       ([8, 8], "0f3a9c", "malformed metadata entry")):  # no DTYPE: prefix
        entry = {"shape": shape, **({"fingerprint": fingerprint} if fingerprint is not None else {})}
        meta = {"format": 1, "tensors": {"w": entry}}
        path = tmp_path / "m.safetensors"
        save_file({"w": np.zeros(8, np.uint8)}, str(path), metadata={"ckptprobe": json.dumps(meta)})
        for args in (["masks", "info", str(path)], ["masks", "export", str(path), "--to", "peft", "--budget", "1"]):
            run_error(capsys, args, needle)


def test_help_on_a_terminal_one_column_wide(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1")
    assert main(["--help"]) == 0
    assert "Commands:" in capsys.readouterr().out


def test_ctrl_c_says_so_and_leaves_nothing(tmp_path):
    # SIGINT during a long command (the example family's training): exit 130, one line, no files written
    import signal
    import time

    target = tmp_path / "family"
    # SIGINT at its default in the child: a runner that started this suite in the background of a
    # script (`cmd &`) passes it down ignored, and then no program sees a Ctrl-C
    p = subprocess.Popen([sys.executable, "-m", "ckptprobe", "demo", "--rebuild", str(target)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": REPO},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.5)  # past start-up: inside the command (the training imports torch first)
    # Pressed again while it runs, as a user would: a Ctrl-C landing inside some library's import can be
    # lost (4 of 60 bare `import torch` runs lost one inside torch's import of numpy), and one run of this
    # command in ~80 on a loaded machine went on training.
    for _ in range(12):
        p.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            out, err = p.communicate(timeout=5)
            break
    else:
        p.kill()
        out, err = p.communicate()
    assert p.returncode == 130 and out == ""
    assert err.strip().splitlines()[-1] == "Interrupted" and "Traceback" not in err
    assert not target.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["sparsity", "spectrum", "principal", "consensus", "drift", "profile"])
def test_nothing_compared_is_an_error(tmp_path, capsys, command):
    """Checkpoints with the same names but other shapes (another model size): no table and exit 0, but
    one line saying nothing was compared and why."""
    w = tiny_weights(0)
    base = save(tmp_path / "base.safetensors", w)
    other = save(tmp_path / "other.safetensors", {n: np.zeros((2, *x.shape), np.float32) for n, x in w.items()})
    runs = [other, other] if command in ("consensus", "profile") else [other]
    line = run_error(capsys, [command, str(base), *map(str, runs)], "was compared", "shape differs")
    assert line.startswith("Error: no matrix" if command in ("spectrum", "principal") else "Error: no tensor")
    assert main([command, str(base), *map(str, runs), "-v"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) > len(w) // 2 and all(e.startswith("skipped ") for e in err[:-1]) and err[-1].startswith("Error:")


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
                "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
                "vocab_size": 48}


@pytest.mark.parametrize("command", ["sparsity", "spectrum", "principal", "consensus", "drift", "profile",
                                     "masks build", "scramble"])
@pytest.mark.parametrize("empty_side", ["base", "run"])
def test_a_checkpoint_without_tensors_is_named(tmp_path, capsys, command, empty_side):
    """An empty header (a valid safetensors file) or an index with an empty weight map: one line naming it,
    not "no tensor name in common: e.g. None vs None"."""
    full = save(tmp_path / "full.safetensors", tiny_weights(0))
    empty_file = tmp_path / "empty.safetensors"
    write_safetensors(empty_file, {}, {"format": "pt"})
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    (empty_folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    (empty_folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))  # what scramble reads first
    for empty in (empty_folder,) if command == "scramble" else (empty_file, empty_folder):
        base, run = (empty, full) if empty_side == "base" else (full, empty)
        args = {"masks build": ["masks", "build", str(base), "--kind", "update", "--from", str(run), "--vectors",
                                "train", "-o", str(tmp_path / "m.ckmask")],
                "scramble": ["scramble", str(base), "-o", str(tmp_path / "out"), "--seed", "1"]}.get(
                    command, [command, str(base), *[str(run)] * (2 if command in ("consensus", "profile") else 1)])
        if command == "scramble" and empty_side == "run":
            continue  # scramble reads one checkpoint
        run_error(capsys, args, str(empty), "holds no tensors")
        assert not (tmp_path / "out").exists()
