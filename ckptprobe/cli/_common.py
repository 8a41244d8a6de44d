"""What every command does around its analysis, written once: check the options before any work,
open the checkpoints, label them, report what was skipped, and write the result."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ckptprobe.analysis.choices import DEFAULT_ATOL, DEFAULT_ETA
from ckptprobe.errors import UsageError
from ckptprobe.report.labels import label, labels  # noqa: F401  (re-exported for the commands)
from ckptprobe.report.output import Format

FIGURE_FORMATS = (".png", ".pdf", ".svg")
SUFFIX_FORMATS = {".json": Format.json, ".csv": Format.csv}


@dataclass(frozen=True)
class Output:
    """Where and how a command writes its result, checked before any work."""

    fmt: Format
    path: Path | None
    verbose: bool = False


def check_output(fmt: Format | None, output: Path | None, verbose: bool = False) -> Output:
    """The format (`--format`, else from the `-o` extension, else table) and a writable `-o`.

    Raises UsageError when `--format` contradicts the extension, OSError when `-o` is a directory or
    cannot be created.
    """
    implied = SUFFIX_FORMATS.get(output.suffix.lower()) if output is not None else None
    if fmt is not None and implied is not None and fmt != implied:
        raise UsageError(f"-o {output} has the extension of {implied.value}, but --format is {fmt.value}",
                         hint=f"drop --format, or name the file {output.with_suffix('')}.{fmt.value}"
                         if fmt != Format.table else "drop --format, or use another file name")
    if output is not None:
        writable("-o", output)
    return Output(fmt or implied or Format.table, output, verbose)


def check_plot(plot: Path | None, out: Output, figures: Sequence[str] = ()) -> list[Path]:
    """The files `--plot FILE` will write: FILE itself, or for a command with several `figures`, one
    file per figure named FILE's stem + '-' + figure. Checked (extension, writable, not the `-o` of
    `out`) before any work."""
    if plot is None:
        return []
    if plot.is_dir():  # a name ending in a separator is refused when parsed (`_options.file_name`)
        raise UsageError(f"--plot {plot} is a folder; --plot takes a file name",
                         hint=f"e.g. --plot {plot / 'figure.png'} (its extension gives the format)")
    if plot.suffix.lower() not in FIGURE_FORMATS:
        example = plot / "figure.png" if not plot.suffix else plot.with_suffix(".png")
        raise UsageError(f"--plot {plot}: the file's extension must be one of {', '.join(FIGURE_FORMATS)}",
                         hint=f"e.g. --plot {example}")
    paths = [plot.with_name(f"{plot.stem}-{f}{plot.suffix}") for f in figures] if figures else [plot]
    for p in paths:
        if out.path is not None and os.path.realpath(p) == os.path.realpath(out.path):
            raise UsageError(f"--plot {plot} would write {p}, which -o also names", hint="give them other names")
        writable("--plot", p)
    return paths


def writable(option: str, path: Path) -> None:
    from ckptprobe.io.writer import check_writable

    try:
        check_writable(path)
    except OSError as e:
        raise UsageError(f"{option} {path}: {e.strerror}") from None


def tolerances(mode, eta: float | None, atol: float | None) -> tuple[float, float]:
    """`(eta, atol)` with their defaults filled in. --eta and --atol are read by one mode each: giving
    one with another mode is a mistake, reported rather than ignored."""
    for name, value in (("eta", eta), ("atol", atol)):
        if value is not None and (mode is None or mode.value != name):
            raise UsageError(f"--{name} is read only by --mode {name}"
                             + (f", not by --mode {mode.value}" if mode is not None else ""),
                             hint=f"add --mode {name}, or drop --{name}")
    return (DEFAULT_ETA if eta is None else eta), (DEFAULT_ATOL if atol is None else atol)


def pick_layer(source, include: Sequence[str], exclude: Sequence[str], layer: int | None) -> int | None:
    """`layer` when some selected tensor of `source` lies in it (UsageError naming the layers there are,
    otherwise), the middle layer when `layer` is None, None when no tensor has a layer index."""
    from ckptprobe.analysis.pairing import selected
    from ckptprobe.io.names import parse_name

    layers = sorted({parse_name(n).layer for n in source.keys() if selected(n, include, exclude)} - {None})
    if layer is None:
        return layers[len(layers) // 2] if layers else None
    if layer not in layers:
        where = f"layers {layers[0]}..{layers[-1]}" if layers else "no tensor has a layer index"
        raise UsageError(f"--layer {layer}: no selected tensor of {source.ref} is in that layer ({where})")
    return layer


def expand_series(refs: Sequence[str], revision: str | None, token: str | None) -> list[str]:
    """The checkpoints a series pattern names (`org/name@step-*`, `run/step-{100..500..100}`), in order."""
    from ckptprobe.io.series import expand_refs

    return expand_refs(refs, revision, token)


def open_sources(refs: Sequence[str], revision: str | None, token: str | None, download: bool,
                 strip_prefix: str | None = None, add_prefix: str | None = None) -> list:
    """Open every reference (file, folder or Hub repo) with the same Hub options; the names of every
    checkpoint after the first (the base) lose `strip_prefix` and gain `add_prefix`."""
    from ckptprobe.analysis.pairing import renamed
    from ckptprobe.analysis.plan import require_tensors
    from ckptprobe.io.sources import open_source

    sources = [open_source(r, revision, token, download) for r in refs]
    require_tensors(sources)
    return sources[:1] + [renamed(s, strip_prefix, add_prefix) for s in sources[1:]]


def configure_threads(threads: int | None, workers: int | None = 1) -> int:
    """Apply `--threads` (or the default thread policy) to torch and BLAS.

    A command whose work runs in window workers passes its `--workers` (None: the default, every
    usable CPU): each worker gets `threads // workers` (one by default; their work uses neither
    library). Called before numpy is imported, so that its BLAS starts no thread it will not use:
    an idle OpenBLAS thread spins for ~0.1 s of CPU after it starts, beside the workers.
    """
    from ckptprobe._threads import configure, usable_cpus

    return configure(threads, workers or usable_cpus())


def report_skipped(skipped: Sequence, verbose: bool) -> None:
    """One line on stderr counting what was skipped and why; every tensor and its reason with `verbose`.
    Never a table on stdout: the full list is in JSON (and CSV with --by tensor where a command has it)."""
    from ckptprobe.analysis.plan import skip_summary

    if not skipped:
        return
    lines = [f"skipped {s.name}: {s.reason}" for s in skipped] if verbose else \
        [skip_summary(skipped) + "; --verbose lists them"]
    for line in lines:
        print(line, file=sys.stderr)


def require_some(found: Sequence, skipped: Sequence, verbose: bool, what: str) -> None:
    """Nothing compared is an error (one line: the skips in short), not an empty table and exit 0.
    Call it before `report_skipped`; with `verbose` it lists the skipped tensors first."""
    if found:
        return
    from ckptprobe.analysis.plan import skip_summary
    from ckptprobe.errors import TensorMismatchError

    if verbose:
        report_skipped(skipped, True)
    why = skip_summary(skipped)
    raise TensorMismatchError(f"no {what} was compared" + (f" ({why})" if why else ""),
                              hint=None if verbose or not why else "--verbose lists each with its reason")


def wrote(paths: Sequence[Path]) -> None:
    """Say on stderr which files were written."""
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)


def emit(out: Output, data: dict, rows: Sequence[dict], tables: Sequence) -> None:
    """Write the result: `tables` (table), `data` (json) or `rows` (csv), to `-o` or stdout."""
    from ckptprobe.report.output import emit as write

    write(out.fmt, data, rows, tables, out.path)


def head_dim_of(base: str) -> int | None:
    """Head size from config.json beside a local base checkpoint (key head_dim, or hidden_size/num_attention_heads)."""
    from ckptprobe.io.config import local_config

    cfg = local_config(base)
    if cfg is None:
        return None
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg  # multimodal configs nest it
    hd = cfg.get("head_dim")
    if isinstance(hd, int) and hd > 0:
        return hd
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None
