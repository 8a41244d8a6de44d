"""The command line as one layer: the same options everywhere, help without noise, `--version`, usage
errors in one plain line, and library errors shown with the flag the user typed."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
from factory import bump, run_error, save, tiny_weights

from ckptprobe import __version__
from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from ckptprobe.cli import main
from ckptprobe.cli._app import COMMANDS, command_object
from ckptprobe.cli._errors import describe
from ckptprobe.errors import UsageError
from ckptprobe.io.maskfile import read_masks


def test_version(capsys):
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out == f"ckptprobe {__version__}\n"


def test_root_help_lists_every_command_with_its_own_summary(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, (_, summary) in COMMANDS.items():
        assert f"{name} {' '.join(summary.split())}" in text
        obj = command_object(name)
        doc = obj.info.help if hasattr(obj, "info") else inspect.getdoc(obj)
        assert " ".join(doc.split()).startswith(" ".join(summary.split())), name  # the summary is the help's start
    assert main([]) == 0 and "Usage: ckptprobe" in capsys.readouterr().out


def test_root_help_imports_neither_typer_nor_the_commands():
    import subprocess
    import sys

    code = ("import sys; from ckptprobe.cli import main; main(['--help']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('typer', 'click', 'rich', 'numpy') "
            "or m.startswith('ckptprobe.cli.') and m not in ('ckptprobe.cli._app',)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_command_help_loads_no_array_library():
    """A command's help (and so any usage error found while parsing) loads typer, not numpy or torch."""
    import subprocess
    import sys

    heavy = ("numpy", "torch", "scipy", "matplotlib", "huggingface_hub")
    commands = [[*c.split()] for c in [*COMMANDS, "masks build", "masks info", "masks export"]]
    code = ("import sys; from ckptprobe.cli import main\n"
            f"for c in {commands!r}: main([*c, '--help'])\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", [c if c != "masks" else "masks build" for c in COMMANDS]
                         + ["masks info", "masks export"])
def test_help_has_no_type_noise(capsys, command):
    assert main([*command.split(), "--help"]) == 0
    text = capsys.readouterr().out
    assert "Usage: ckptprobe" in text
    for noise in ("<bool>", "<list[str]>", "<str>", "<path>", "<file>"):
        assert noise not in text, (command, noise)


def test_unknown_command_is_one_line(capsys):
    run_error(capsys, ["sparsty"], "no command 'sparsty'; did you mean 'sparsity'?", code=2, hint="sparsity, spectrum")


def test_usage_errors_are_one_plain_line(tiny_pair, capsys):
    base, ft = str(tiny_pair.base), str(tiny_pair.ft)
    help_hint = True  # a value Typer refused points at the command's help
    cases = [
        (["spectrum", base, ft, "-k", "0"], "--rank: must be >= 1, got 0", help_hint),
        (["spectrum", base, ft, "--device", "gpu"], "--device: 'gpu' is not auto, cpu, cuda or cuda:N", help_hint),
        (["principal", base, ft, "--alpha", "0"], "--alpha: must be a fraction in (0, 1], got 0", help_hint),
        (["principal", base, ft, "--mode", "bitwise", "--eta", "0.1"], "--eta is read only by --mode eta", False),
        (["consensus", base, ft, ft, "--threads", "0"], "--threads: must be >= 1, got 0", help_hint),
        (["drift", base, ft, "--z", "x"], "--z: must be a number, got 'x'", help_hint),
        (["demo", "--format", "xml"], "--format: 'xml' is not one of", help_hint),
    ]
    for args, words, hinted in cases:
        line = run_error(capsys, args, words, code=2, hint=f"`ckptprobe {args[0]} --help`" if hinted else None)
        assert "Value error" not in line and "Input should" not in line


def test_the_same_option_is_spelled_the_same_in_every_command():
    """An option's flags, default and help are one definition: compare every command that has it."""
    import typer

    from ckptprobe.cli._app import build_app

    seen: dict[str, tuple] = {}
    group = typer.main.get_command(build_app())
    commands = [(n, c) for n, c in group.commands.items() if n != "masks"]
    commands += [(f"masks {n}", c) for n, c in group.commands["masks"].commands.items()]
    for name, command in commands:
        for p in command.params:
            if p.param_type_name != "option":
                continue
            key = p.name
            # --seed seeds different draws (mask positions, scramble rotations), -k ranks spectrum's subspaces
            # and the principal mask's reconstruction, with other defaults: one flag, its own help.
            spec = (tuple(sorted(p.opts)), p.help if key not in ("by", "output", "layer", "seed", "rank") else None)
            if key in seen and key not in ("output",):  # masks build -o is the mask file itself
                assert seen[key][1] == spec, (name, key, seen[key])
            seen.setdefault(key, (name, spec))
    for key in ("include", "exclude", "fmt", "threads", "device", "rank", "alpha", "mode", "eta", "plot",
                "verbose", "revision", "token"):
        assert key in seen, key
    assert seen["rank"][1][0] == ("--rank", "-k")


@pytest.mark.parametrize("command", ["spectrum", "principal", "masks build"])
def test_the_default_rank_in_help_is_the_one_used(command):
    """-k's default as its help states it, min(64, min(m, n) // d), against the function each command calls."""
    import typer

    from ckptprobe.analysis.mask_select import default_rank
    from ckptprobe.analysis.spectrum import default_k
    from ckptprobe.cli._app import build_app

    found = typer.main.get_command(build_app())
    for part in command.split():
        found = found.commands[part]
    shown = next(p.show_default for p in found.params if p.name == "rank")
    d = int(re.fullmatch(r"min\(64, min\(m, n\) // (\d+)\) per matrix, at least 1", shown)[1])
    rule = default_k if command == "spectrum" else default_rank
    for shape in [(4096, 1536), (128, 64), (64, 300), (20, 7), (3, 3)]:
        assert rule(shape) == max(1, min(64, min(shape) // d)), shape


def test_library_errors_name_the_flag():
    assert describe(UsageError("k=80 exceeds the smaller side", param="k")) == ("-k 80 exceeds the smaller side", None)
    assert describe(UsageError("must be in (0, 1]", hint="a fraction", param="min_agree")) == (
        "--min-agree: must be in (0, 1]", "a fraction")
    assert describe(FileNotFoundError(2, "No such file or directory", "/x")) == ("No such file or directory: /x", None)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """A base and three runs, each moving a known random set of entries by one bf16 ULP."""
    root = tmp_path_factory.mktemp("runs")
    bits = {n: float32_to_bf16_bits(x) for n, x in tiny_weights(0).items()}
    rng = np.random.default_rng(7)
    changed = [{n: rng.random(b.shape) < 0.4 for n, b in bits.items()} for _ in range(3)]
    base = save(root / "base.safetensors", {n: bf16_bits_to_float32(b) for n, b in bits.items()})
    runs = [save(root / f"run{i}.safetensors", {n: bf16_bits_to_float32(bump(b, c[n])) for n, b in bits.items()})
            for i, c in enumerate(changed)]
    return base, runs, changed


@pytest.mark.parametrize("n", [1, 2, 3])
def test_min_agree_counts_runs(three_runs, tmp_path, capsys, n):
    base, runs, changed = three_runs
    out = tmp_path / "m.safetensors"
    assert main(["masks", str(base), "--kind", "consensus", "--from", *map(str, runs), "--min-agree", str(n),
                 "--vectors", "freeze", "-o", str(out)]) == 0
    mf = read_masks(out)
    assert mf.recipe["min_runs"] == n
    name = "model.layers.1.mlp.up_proj.weight"
    assert np.array_equal(mf.mask(name), sum(c[name].astype(int) for c in changed) >= n)
    err = capsys.readouterr().err
    kept = sum(int(mf.count(t)) for t in mf.keys())
    total = sum(int(np.prod(mf.shape(t))) for t in mf.keys())
    assert re.fullmatch(rf"consensus: {100 * kept / total:.1f}% of entries trainable \({kept:,} of {total:,}\); "
                        rf"wrote {re.escape(str(out))}\n", err)


def test_min_agree_beyond_the_runs_is_an_error(three_runs, tmp_path, capsys):
    base, runs, _ = three_runs
    out = tmp_path / "m.safetensors"
    run_error(capsys, ["masks", str(base), "--kind", "consensus", "--from", *map(str, runs), "--min-agree", "4",
                       "--vectors", "freeze", "-o", str(out)], "--min-agree 4: more than the 3 --from runs", code=2)
    run_error(capsys, ["masks", str(base), "--kind", "low", "--min-agree", "2", "--vectors", "freeze",
                       "-o", str(out)], "--min-agree is only read by the consensus kind", code=2)
    assert not out.exists()


def test_tables_off_a_terminal_are_never_cut(tiny_pair, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    assert main(["sparsity", str(tiny_pair.base), str(tiny_pair.ft), "--by", "tensor"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    for name, mask in tiny_pair.changed.items():
        row = next(line for line in out.splitlines() if f" {name} " in line)
        assert f"{int(mask.sum()):,}" in row and f"{1 - mask.mean():.4g}" in row


@pytest.mark.parametrize("command", ["sparsity", "masks", "consensus"])
def test_a_command_alone_shows_its_help(capsys, command):
    assert main([command]) == 0
    captured = capsys.readouterr()
    assert f"Usage: ckptprobe {command}" in captured.out and captured.err == ""


def test_consensus_says_what_it_covers(three_runs, capsys):
    base, runs, _ = three_runs
    args = ["consensus", str(base), *map(str, runs)]
    assert main(args) == 0
    whole = capsys.readouterr().out
    assert "whole model, 3 runs" in whole and "Pairwise Jaccard, whole model" in whole
    assert main([*args, "--include", "*.layers.1.*"]) == 0
    part = capsys.readouterr().out
    assert "whole model" not in part and "selected tensors, 3 runs" in part


def test_demo_alpha_zero_is_a_usage_error(capsys):
    run_error(capsys, ["demo", "--alpha", "0"], "--alpha: must be a fraction in (0, 1], got 0", code=2)
