"""`ckptprobe sparsity` on the command line: output formats and files, errors and exit codes."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from factory import one_line_error, run_error, save, tiny_weights

from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from ckptprobe.cli import main
from ckptprobe.errors import InvalidCheckpointError, UsageError
from ckptprobe.io.writer import write_safetensors

TENSOR_FIELDS = {"name", "layer", "module", "group", "shape", "dtype", "numel", "changed", "sparsity"}


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["sparsity", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def planted(tiny_pair) -> tuple[int, int]:
    return (sum(m.size for m in tiny_pair.changed.values()), sum(int(m.sum()) for m in tiny_pair.changed.values()))


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_json(tiny_pair, capsys, layout):
    base, ft = (tiny_pair.base, tiny_pair.ft) if layout == "file" else (tiny_pair.base_dir, tiny_pair.ft_dir)
    code, out, err = run(capsys, base, ft, "--format", "json")
    assert code == 0 and err == ""
    data = json.loads(out)  # stdout holds the JSON and nothing else
    assert data["command"] == "sparsity" and data["base"] == str(base) and data["finetuned"] == str(ft)
    assert data["mode"] == "auto"
    numel, changed = planted(tiny_pair)
    assert data["total"] == {"numel": numel, "changed": changed, "nonfinite": 0,
                             "sparsity": pytest.approx((numel - changed) / numel)}
    assert len(data["tensors"]) == len(tiny_pair.changed) and data["skipped"] == []
    for t in data["tensors"]:
        assert TENSOR_FIELDS <= set(t)
        mask = tiny_pair.changed[t["name"]]
        assert (t["shape"], t["dtype"], t["numel"], t["changed"]) == (list(mask.shape), "BF16", mask.size, int(mask.sum()))
        assert t["sparsity"] == pytest.approx(1 - mask.mean())
    q = next(t for t in data["tensors"] if t["name"] == "model.layers.1.self_attn.q_proj.weight")
    assert (q["layer"], q["module"], q["group"], q["mode"]) == (1, "q", "attention", "bitwise")
    # groups: by module and by layer (and group), each summing to the total
    for key in ("module", "layer", "group"):
        rows = data["groups"][key]
        assert sum(r["numel"] for r in rows) == numel and sum(r["changed"] for r in rows) == changed
        for r in rows:
            members = [t for t in data["tensors"] if t[key] == r[key]]
            assert r["changed"] == sum(t["changed"] for t in members) and r["numel"] == sum(t["numel"] for t in members)
    assert [r["layer"] for r in data["groups"]["layer"]] == [0, 1, None]
    assert {r["module"] for r in data["groups"]["module"]} == {"embed", "q", "k", "v", "o", "gate", "up", "down",
                                                                "norm", "lm_head"}


@pytest.mark.parametrize("by", ["module", "layer", "group", "tensor"])
def test_csv(tiny_pair, capsys, by):
    code, out, _ = run(capsys, tiny_pair.base, tiny_pair.ft, "--format", "csv", "--by", by)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    data = json.loads(run(capsys, tiny_pair.base, tiny_pair.ft, "-f", "json")[1])
    expected = data["tensors"] if by == "tensor" else data["groups"][by]
    key = "name" if by == "tensor" else by
    assert out.splitlines()[0].split(",")[0] == key
    assert [r[key] for r in rows] == [str(e[key]) if e[key] is not None else "" for e in expected]
    assert [int(r["changed"]) for r in rows] == [e["changed"] for e in expected]
    assert sum(int(r["numel"]) for r in rows) == planted(tiny_pair)[0]


def test_table(tiny_pair, capsys):
    code, out, err = run(capsys, tiny_pair.base, tiny_pair.ft)
    numel, changed = planted(tiny_pair)
    text = " ".join(out.split())
    assert code == 0 and err == ""
    assert "Update sparsity of" in text and f"total: {changed:,} of {numel:,} entries changed" in text
    assert "mode auto: bitwise" in text
    code, out, _ = run(capsys, tiny_pair.base, tiny_pair.ft, "--by", "layer")
    assert code == 0 and "by layer" in out


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_output_file(tiny_pair, capsys, tmp_path, fmt):
    target = tmp_path / f"result.{fmt}"
    code, out, err = run(capsys, tiny_pair.base, tiny_pair.ft, "-f", fmt, "-o", target)
    assert code == 0 and out == ""
    assert os.listdir(tmp_path) == [target.name]  # no temporary file left beside it
    text = target.read_text()
    assert err.splitlines()[-1] == f"wrote {target}"  # every format says where its output went
    if fmt == "json":
        assert json.loads(text)["total"]["changed"] == planted(tiny_pair)[1]
    elif fmt == "csv":
        assert text.splitlines()[0] == "module,numel,changed,nonfinite,sparsity"
    else:
        assert "total:" in text


def test_failed_run_writes_no_file(tiny_pair, capsys, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_pair.ft.read_bytes()[:-100])
    target = tmp_path / "out" / "result.json"
    target.parent.mkdir()
    code, out, err = run(capsys, tiny_pair.base, broken, "-f", "json", "-o", target)
    assert code == 1 and out == ""
    one_line_error(err, str(broken), "truncated")
    assert os.listdir(target.parent) == []


@pytest.mark.parametrize("args,words", [
    (["--mode", "nope"], ["--mode", "'nope' is not one of"]),
    (["--format", "xml"], ["--format", "'xml' is not one of"]),
    (["--by", "row"], ["--by", "'row' is not one of"]),
    (["--eta", "-1", "--mode", "eta"], ["--eta", "must be a finite number >= 0, got -1"]),
    (["--eta", "nan", "--mode", "eta"], ["--eta", "must be a finite number >= 0, got nan"]),
    (["--atol", "inf", "--mode", "atol"], ["--atol", "must be a finite number >= 0, got inf"]),
    (["--eta", "0.1"], ["--eta", "--mode eta"]),
    (["--mode", "bitwise", "--atol", "0.1"], ["--atol", "not by --mode bitwise"]),
    (["--workers", "0"], ["--workers", "must be >= 1"]),
    (["--no-such-option"], ["no option --no-such-option"]),
])
def test_usage_errors_exit_2(tiny_pair, capsys, args, words):
    run_error(capsys, ["sparsity", str(tiny_pair.base), str(tiny_pair.ft), *args], *words, code=2)


def test_missing_argument_exits_2(tiny_pair, capsys):
    run_error(capsys, ["sparsity", str(tiny_pair.base)], "missing argument FT", code=2,
              hint="ckptprobe sparsity --help")


def test_help_teaches(capsys):
    assert main(["sparsity", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("fraction of weights a fine-tune left unchanged", "bitwise", "bf16", "eta", "atol",
                  "1024.001", "*.layers.13.*", "--format", "skipped"):
        assert words in text, words
    assert main(["--help"]) == 0
    assert "sparsity" in capsys.readouterr().out


def mixed_dtype_pair(tiny_pair, tmp_path):
    base32 = save(tmp_path / "base32.safetensors",
                  {n: bf16_bits_to_float32(float32_to_bf16_bits(x)) for n, x in tiny_weights(0).items()}, dtype="F32")
    return base32, tiny_pair.ft


def test_mixed_dtypes(tiny_pair, capsys, tmp_path):
    base32, ft = mixed_dtype_pair(tiny_pair, tmp_path)
    code, out, err = run(capsys, base32, ft, "-f", "json")
    assert code == 0
    data = json.loads(out)
    assert data["total"]["changed"] == planted(tiny_pair)[1]
    assert {(t["dtype"], t["ft_dtype"], t["mode"]) for t in data["tensors"]} == {("F32", "BF16", "bf16")}
    code, out, err = run(capsys, base32, ft, "--mode", "bitwise")
    assert code == 2 and out == ""
    one_line_error(err, "model.embed_tokens.weight", "F32", "BF16", hint="--mode bf16")


def test_skipped_listed_with_warning(tiny_pair, capsys, tmp_path):
    w = {n: bf16_bits_to_float32(float32_to_bf16_bits(x)) for n, x in tiny_weights(0).items()}
    w["model.embed_tokens.weight"] = np.vstack([w["model.embed_tokens.weight"], np.zeros((16, 32), np.float32)])
    del w["lm_head.weight"]
    ft = save(tmp_path / "resized.safetensors", w)
    code, out, err = run(capsys, tiny_pair.base, ft, "-f", "json")
    assert code == 0
    data = json.loads(out)
    assert data["skipped"] == [
        {"name": "model.embed_tokens.weight", "category": "shape",
         "reason": f"shape (48, 32) in base vs (64, 32) in {ft}"},
        {"name": "lm_head.weight", "category": "missing", "reason": f"only in base (missing in {ft})"}]
    assert len(data["tensors"]) == len(tiny_pair.changed) - 2 and data["total"]["changed"] == 0
    assert err.strip().splitlines() == [
        "skipped 2 tensors: 1 shape differs, 1 in one checkpoint only; --verbose lists them"]
    code, out, err = run(capsys, tiny_pair.base, ft, "--verbose")  # the list on stderr, never on stdout
    assert code == 0 and "lm_head.weight" not in out and "Skipped" not in out
    assert err.strip().splitlines() == [
        f"skipped model.embed_tokens.weight: shape (48, 32) in base vs (64, 32) in {ft}",
        f"skipped lm_head.weight: only in base (missing in {ft})"]
    code, out, _ = run(capsys, tiny_pair.base, ft, "-f", "csv", "--by", "tensor")
    assert code == 0 and "lm_head.weight" not in out  # CSV rows are the compared tensors; JSON lists skips


def test_include_exclude(tiny_pair, capsys):
    code, out, _ = run(capsys, tiny_pair.base, tiny_pair.ft, "-f", "json", "-i", "*.layers.1.*", "--include",
                       "model.embed_tokens.*", "-x", "*norm*", "--exclude", "*_proj.weight")
    assert code == 0
    names = [t["name"] for t in json.loads(out)["tensors"]]
    assert names == ["model.embed_tokens.weight"]
    run_error(capsys, ["sparsity", str(tiny_pair.base), str(tiny_pair.ft), "-f", "json", "-i", "nothing"],
              "--include 'nothing' matches no tensor of", str(tiny_pair.base))


def test_nonfinite_and_f16(capsys, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(a, {"nan": ("F16", np.full(3, np.nan, np.float16)), "w": ("F16", np.array([1, 2, -0.0], np.float16))})
    write_safetensors(b, {"nan": ("F16", np.full(3, np.nan, np.float16)), "w": ("F16", np.array([1, 3, 0.0], np.float16))})
    code, out, _ = run(capsys, a, b, "-f", "json", "--by", "tensor")
    assert code == 0
    data = json.loads(out)
    assert data["total"] == {"numel": 6, "changed": 1, "nonfinite": 3, "sparsity": pytest.approx(2 / 3)}
    assert data["tensors"][0]["sparsity"] is None  # no finite entry: JSON null, not NaN
    code, out, _ = run(capsys, a, b, "-i", "nan")  # every entry non-finite: the table still prints
    assert code == 0 and "nan" in out


def test_debug_shows_the_exception(tiny_pair, capsys, tmp_path, monkeypatch):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    monkeypatch.setenv("CKPTPROBE_DEBUG", "1")
    with pytest.raises(InvalidCheckpointError, match="not valid JSON"):
        main(["sparsity", str(tiny_pair.base), str(broken)])
    base32, ft = mixed_dtype_pair(tiny_pair, tmp_path)
    with pytest.raises(UsageError):
        main(["sparsity", str(base32), str(ft), "--mode", "bitwise"])
    monkeypatch.setenv("CKPTPROBE_DEBUG", "0")
    assert main(["sparsity", str(tiny_pair.base), str(broken)]) == 1


def test_console_entry_point(tiny_pair, tmp_path):
    """The real process: exit codes, one line on stderr, data on stdout."""
    pickle_file = tmp_path / "model.bin"
    pickle_file.write_bytes(b"\x80\x04N.")
    env = {k: v for k, v in os.environ.items() if k != "CKPTPROBE_DEBUG"}
    cmd = [sys.executable, "-m", "ckptprobe", "sparsity"]
    p = subprocess.run(cmd + [str(tiny_pair.base), str(pickle_file)], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and p.stdout == ""
    one_line_error(p.stderr, str(pickle_file), "pickle", hint="safe_serialization")
    p = subprocess.run(cmd + [str(tiny_pair.base), str(tiny_pair.ft), "-f", "json"], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0 and json.loads(p.stdout)["total"]["changed"] == planted(tiny_pair)[1]


def test_a_run_on_16_bit_files_never_imports_numpy(tmp_path):
    """The compiled loop reads and counts local bf16 and fp16 files itself: a whole run, small tensors
    and large, in one process and on worker processes, loads no numpy (~0.1 s of each start)."""
    from ckptprobe.analysis import kernels
    from ckptprobe.io.sources import SMALL_READ

    if not hasattr(kernels.compiled, "count16_files"):
        pytest.skip("ckptprobe was installed without its compiled file loops (no C compiler, or no pread)")
    rng = np.random.default_rng(3)
    big = float32_to_bf16_bits(rng.standard_normal((64, SMALL_READ // 64)))  # 2 x SMALL_READ bytes
    base = {"model.layers.0.mlp.up_proj.weight": ("BF16", big),
            "model.layers.0.input_layernorm.weight": ("F16", rng.standard_normal(7).astype(np.float16)),
            "model.norm.weight": ("BF16", float32_to_bf16_bits(rng.standard_normal(5)))}
    changed = {n: rng.random(x.shape) < 0.3 for n, (_, x) in base.items()}
    ft = {n: (d, np.where(changed[n], x.view(np.uint16) ^ 1, x.view(np.uint16)).view(x.dtype))  # one ULP
          for n, (d, x) in base.items()}
    write_safetensors(tmp_path / "a.safetensors", base)
    write_safetensors(tmp_path / "b.safetensors", ft)
    f32 = {n: ("F32", rng.standard_normal(5).astype(np.float32)) for n in ("x", "y")}
    write_safetensors(tmp_path / "f32.safetensors", f32)
    code = ("import sys; from ckptprobe.cli import main\n"
            "a, b, f32 = sys.argv[1:4]\n"
            "for i, workers in enumerate(sys.argv[4:]):\n"
            "    main(['sparsity', a, b, '-f', 'json', '-o', f'{a}.{i}.json', '--workers', workers])\n"
            "print('numpy' in sys.modules)\n"
            "main(['sparsity', f32, f32, '-f', 'json', '-o', f'{f32}.json', '--workers', '2'])\n"
            "print('numpy' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / f"{n}.safetensors") for n in ("a", "b", "f32")),
                          "1", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # with one worker the counts ran in this process; float32 pairs need numpy, imported here before
    # the workers fork rather than in each of them
    assert res.stdout.split() == ["False", "True"]
    for i in range(2):
        tensors = json.loads((tmp_path / f"a.safetensors.{i}.json").read_text())["tensors"]
        assert {t["name"]: t["changed"] for t in tensors} == {n: int(m.sum()) for n, m in changed.items()}
