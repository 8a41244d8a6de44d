"""The README and docs/*.md run as written, on the shipped example family.

Every fenced block labelled `bash` or `python` is extracted from the files themselves (no
second copy) and run, in document order, in a fresh folder per document:

- a document's bash blocks run as one script in one `bash -e` process (so a `cd` or a file
  written by one block is there for the next, as in one terminal session); its python blocks
  then run in one namespace, in the folder where the bash script ended;
- `ckptprobe` inside that script is a shell function that hands its arguments to this test
  process, which runs `ckptprobe.cli.main(argv)` in-process (the same code as the console
  script, without a Python start-up per command); its output and exit code go back to bash;
- each document runs in a fresh copy of the repository (its commands are written for the
  root of a clone: `python examples/...`), without .git;
- not run, and only these: `pip install ...` (segments of a `&&` chain or whole lines: the
  suite runs on an installed package); `python -m pytest` (this suite itself); and a python
  block whose first line says `# not run here: <why>, see <path>`, visible to the reader,
  where <path> (checked to exist) is what the suite runs instead (a distributed FSDP2 job,
  a whole TRL setup).

A fence without a language is output, not a command: the test checks that no such block
holds a `ckptprobe` command, so that every command shown is one that runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ckptprobe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"^# not run here: .*\bsee (\S+)$", re.M)
SKIPPED = (re.compile(r"^\s*(python3? -m )?pip install\b"), re.compile(r"^\s*python3? -m pytest\b"))

CLIENT = r"""
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["CKPTPROBE_DOCS_SOCKET"])
s.sendall(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}).encode() + b"\n")
reply = json.loads(s.makefile("rb").readline())
sys.stdout.write(reply["out"]); sys.stderr.write(reply["err"])
sys.exit(reply["code"])
"""


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced block, in order."""
    return [(m[1].lower(), m[2]) for m in FENCE.finditer(path.read_text())]


def commands(text: str) -> list[str]:
    """A bash block's logical lines (continuations joined), minus what `SKIPPED` names."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        parts = [p for p in line.split(" && ") if not any(rx.match(p) for rx in SKIPPED)]
        if any(p.strip() and not p.lstrip().startswith("#") for p in parts):
            out.append(" && ".join(parts))
    return out


def run_bash(script: str, cwd: Path) -> tuple[int, str]:
    """Run `script` with `ckptprobe` served in-process; (exit code, combined output)."""
    client = cwd.parent / "client.py"
    client.write_text(CLIENT)
    sock_path = cwd.parent / "s"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen(1)
    server.settimeout(0.05)
    prelude = f'ckptprobe() {{ "{sys.executable}" -S -I "{client}" "$@"; }}\nset -euo pipefail\n'
    # `python` in a document is the interpreter running the tests, as in an activated environment
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "CKPTPROBE_DOCS_SOCKET": str(sock_path), "COLUMNS": "100", "PATH": path}
    log = cwd.parent / "output.txt"  # a file, not a pipe: a full pipe would stall bash while we wait
    with open(log, "w") as sink:
        proc = subprocess.Popen(["bash", "-c", prelude + script], cwd=cwd, env=env, stdout=sink, stderr=sink)
    try:
        while proc.poll() is None:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                request = json.loads(conn.makefile("rb").readline())
                conn.sendall(json.dumps(serve(request)).encode() + b"\n")
        return proc.returncode, log.read_text()
    finally:
        proc.kill()
        server.close()


def serve(request: dict) -> dict:
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(request["cwd"])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(request["argv"])
    finally:
        os.chdir(here)
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_runs_as_written(doc, tmp_path, monkeypatch):
    found = blocks(doc)
    for lang, text in found:
        if lang == "":
            assert not re.search(r"^\s*(\$ )?ckptprobe ", text, re.M), f"{doc.name}: a command in an unlabelled block"
    bash = [commands(text) for lang, text in found if lang in ("bash", "sh", "shell")]
    python = [text for lang, text in found if lang == "python"]
    work = tmp_path / "work"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache"))
    where = work
    if any(bash):
        lines = [line for block in bash for line in block]
        script = "\n".join(f"echo '$ {line.replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}'\n{line}"
                           for line in lines) + f"\npwd > {tmp_path / 'pwd'}\n"
        code, output = run_bash(script, work)
        assert code == 0, f"{doc.name}: a command failed:\n{output[-3000:]}"
        where = Path((tmp_path / "pwd").read_text().strip())
    monkeypatch.chdir(where)
    namespace = {"__name__": "__main__"}
    for text in python:
        excused = NOT_RUN.match(text)
        if excused:
            assert (ROOT / excused[1]).exists(), f"{doc.name}: names {excused[1]}, which does not exist"
            continue
        exec(compile(text, f"{doc.name} (python block)", "exec"), namespace)


def test_commands_are_extracted():
    """The extraction itself: continuation lines join, pip and pytest are the only things dropped."""
    text = "pip install -e '.[test]' && python -m pytest -q\nckptprobe a \\\n  b  # note\n# comment\nx && pip install y\n"
    assert commands(text) == ["ckptprobe a    b  # note", "x"]
    assert [lang for lang, _ in blocks(ROOT / "README.md")].count("bash") >= 2
