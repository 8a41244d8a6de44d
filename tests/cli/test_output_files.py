"""Where results go: `-o` never destroys what a path names, the format follows the extension, `--plot` is
one file name checked before any work. Every failure is one line, an exit code, and nothing left behind."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from factory import run_error

from ckptprobe.cli import main


def sparsity_args(tiny_pair, *extra) -> list[str]:
    return ["sparsity", str(tiny_pair.base), str(tiny_pair.ft), *map(str, extra)]


def expected_json(tiny_pair, capsys) -> dict:
    assert main(sparsity_args(tiny_pair, "-f", "json")) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("suffix, first", [(".json", "{"), (".csv", "module,"), (".txt", "Update sparsity")])
def test_format_follows_the_extension(tiny_pair, tmp_path, capsys, suffix, first):
    target = tmp_path / f"result{suffix}"
    assert main(sparsity_args(tiny_pair, "-o", target)) == 0
    assert target.read_text().startswith(first)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name, fmt", [("y.json", "csv"), ("y.csv", "json"), ("y.json", "table")])
def test_format_contradicting_the_extension_is_an_error(tiny_pair, tmp_path, capsys, name, fmt):
    run_error(capsys, sparsity_args(tiny_pair, "-o", tmp_path / name, "-f", fmt), f"-o {tmp_path / name}",
              f"--format is {fmt}", code=2)
    assert os.listdir(tmp_path) == []


def test_a_directory_is_refused_before_any_work(tiny_pair, tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"  # opening it would fail: the -o check comes first
    run_error(capsys, ["sparsity", str(tiny_pair.base), str(missing), "-o", str(tmp_path)], f"-o {tmp_path}",
              "is a directory", code=2)
    assert os.listdir(tmp_path) == []


def test_a_symlink_stays_a_link_and_its_target_is_replaced(tiny_pair, tmp_path, capsys):
    target = tmp_path / "real.json"
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert main(sparsity_args(tiny_pair, "-o", link)) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text()) == expected_json(tiny_pair, capsys)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the replaced file keeps its permissions
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]  # no temporary file left


def test_a_dangling_symlink_creates_its_target(tiny_pair, tmp_path, capsys):
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "new.json")
    assert main(sparsity_args(tiny_pair, "-o", link)) == 0
    assert link.is_symlink() and json.loads((tmp_path / "new.json").read_text())["command"] == "sparsity"


def test_a_named_pipe_is_written_in_place(tiny_pair, tmp_path, capsys):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    assert main(sparsity_args(tiny_pair, "-o", fifo)) == 0
    reader.join(10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["pipe.json"]
    assert json.loads(received[0]) == expected_json(tiny_pair, capsys)


def test_a_named_pipe_nobody_reads_is_an_error_not_a_hang(tiny_pair, tmp_path, capsys):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    run_error(capsys, sparsity_args(tiny_pair, "-o", fifo), "no process is reading this named pipe", str(fifo))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_unix_socket_is_written_in_place(tiny_pair, tmp_path, capsys):
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    received = bytearray()

    def serve():
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    t = threading.Thread(target=serve)
    t.start()
    assert main(sparsity_args(tiny_pair, "-o", path, "-f", "json")) == 0
    t.join(10)
    server.close()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert json.loads(received) == expected_json(tiny_pair, capsys)


def _char_device(tmp_path: Path) -> Path:
    """A character device to write to: a private copy of /dev/null where the kernel lets us make one."""
    dev = tmp_path / "null"
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
        return dev
    except OSError:
        return Path("/dev/null")


def test_a_character_device_stays_a_device(tiny_pair, tmp_path, capsys):
    dev = _char_device(tmp_path)
    before = os.stat(dev)
    for fmt in ("json", "table"):
        assert main(sparsity_args(tiny_pair, "-o", dev, "-f", fmt)) == 0
        after = os.stat(dev)
        assert stat.S_ISCHR(after.st_mode) and (after.st_rdev, after.st_ino) == (before.st_rdev, before.st_ino)
    assert not [p for p in dev.parent.iterdir() if p.name.startswith(f".{dev.name}.")]  # no temporary file


@pytest.mark.parametrize("plot, words", [
    ("out.txt", ["--plot", "out.txt", ".png, .pdf, .svg"]),
    ("figs", ["--plot", "figs", "extension"]),
])
def test_bad_plot_paths_fail_before_any_work(tmp_path, capsys, monkeypatch, plot, words):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no-such-checkpoint")  # never opened: the plot path is checked first
    for command in (["spectrum", missing, missing], ["principal", missing, missing], ["drift", missing, missing],
                    ["profile", missing, missing], ["consensus", missing, missing, missing], ["demo"]):
        run_error(capsys, [*command, "--plot", plot], *words, code=2)
    assert os.listdir(tmp_path) == []


def test_plot_is_a_folder_error_names_a_file_to_use(tmp_path, capsys):
    run_error(capsys, ["demo", "--plot", str(tmp_path)], "is a folder", code=2, hint=str(tmp_path / "figure.png"))


def test_a_missing_layer_fails_before_the_svds(tiny_pair, tmp_path, capsys, monkeypatch):
    import ckptprobe.analysis.spectrum as spectrum

    def never(*args, **kwargs):
        raise AssertionError("the analysis ran")

    monkeypatch.setattr(spectrum, "spectrum", never)
    run_error(capsys, ["spectrum", str(tiny_pair.base), str(tiny_pair.ft), "--plot", str(tmp_path / "s.png"),
                       "--layer", "99"], "--layer 99", "layers 0..1", code=2)
    run_error(capsys, ["spectrum", str(tiny_pair.base), str(tiny_pair.ft), "--layer", "1"],
              "--layer only chooses the layer that --plot draws", code=2)
    assert os.listdir(tmp_path) == []


def test_plot_and_output_naming_one_file_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no-such-checkpoint")  # never opened: the clash is found first
    run_error(capsys, ["drift", missing, missing, "--plot", "out.svg", "-o", "out.svg"], "--plot out.svg",
              "which -o also names", code=2)
    run_error(capsys, ["consensus", missing, missing, missing, "--plot", "c.png", "-o", "c-jaccard.png", "-f", "json"],
              "would write c-jaccard.png", code=2)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [["drift", "{m}", "{m}", "-o", "new/"], ["drift", "{m}", "{m}", "--plot", "new/"],
                                  ["masks", "build", "{m}", "--kind", "low", "-o", "new/"],
                                  ["masks", "export", "{m}", "--to", "peft", "-o", "new/"]])
def test_a_name_ending_in_a_separator_names_a_folder(tmp_path, capsys, monkeypatch, args):
    """Path("new/") is "new": without a look at the text, a file named `new` would be written."""
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no-such-checkpoint")
    run_error(capsys, [a.format(m=missing) for a in args], "new/ ends in /, so it names a folder", code=2)
    assert os.listdir(tmp_path) == []


def test_an_output_over_a_file_the_run_reads_is_refused_before_the_work(tiny_pair, tmp_path, capsys, monkeypatch):
    """The clash is found when the input is opened, whichever comes first: never after the analysis."""
    import ckptprobe.analysis.consensus as consensus

    def never(*args, **kwargs):
        raise AssertionError("the analysis ran")

    monkeypatch.setattr(consensus, "consensus", never)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(tiny_pair.base.read_bytes())
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4,
                                                  "hidden_size": 32, "head_dim": 8}))
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for target in ("config.json", "model.safetensors"):  # a folder's config is part of the checkpoint
        run_error(capsys, ["consensus", str(base), str(tiny_pair.ft), str(tiny_pair.ft), "-o", str(base / target),
                           "-f", "json"], str(base / target), "refusing to write over it", code=2)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_a_read_only_file_is_not_replaced(tiny_pair, tmp_path, capsys, monkeypatch):
    """As `>` would fail (root may write anyway, and so may ckptprobe: what os.access says decides)."""
    import ckptprobe.io.writer as writer

    target = tmp_path / "r.json"
    target.write_text("keep")
    real = os.access
    monkeypatch.setattr(writer.os, "access", lambda p, mode: False if str(p) == str(target) else real(p, mode))
    run_error(capsys, sparsity_args(tiny_pair, "-o", target), f"-o {target}", "read-only", code=2)
    assert target.read_text() == "keep"


def test_figures_of_checkpoints_equal_to_their_base_draw_without_warnings(tiny_pair, tmp_path):
    """Nothing positive to put on a log axis, no angle to label (an all-zero base matrix): matplotlib's
    warnings would reach the user's terminal (the suite turns every warning into an error)."""
    from factory import save, tiny_weights

    zeros = save(tmp_path / "zeros.safetensors", {n: np.zeros_like(x) for n, x in tiny_weights(0).items()})
    assert main(["drift", str(tiny_pair.base), str(tiny_pair.base), "--plot", str(tmp_path / "d.png")]) == 0
    assert main(["spectrum", str(zeros), str(tiny_pair.base), "-k", "2", "--include", "*.layers.0.*", "--plot",
                 str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "d.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0
