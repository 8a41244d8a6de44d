"""What every command does around its analysis, written once: check the options before any work,
open the checkpoints, label them, report what was skipped, and write the result."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ckptprobe.errors import UsageError
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
        _writable("-o", output)
    return Output(fmt or implied or Format.table, output, verbose)


def check_plot(plot: Path | None, figures: Sequence[str] = ()) -> list[Path]:
    """The files `--plot FILE` will write: FILE itself, or for a command with several `figures`, one
    file per figure named FILE's stem + '-' + figure. Checked (extension, writable) before any work."""
    if plot is None:
        return []
    text = str(plot)
    if plot.is_dir() or text.endswith(("/", "\\")):
        raise UsageError(f"--plot {plot} is a folder; --plot takes a file name",
                         hint=f"e.g. --plot {plot / 'figure.png'} (its extension gives the format)")
    if plot.suffix.lower() not in FIGURE_FORMATS:
        raise UsageError(f"--plot {plot}: the extension must be one of {', '.join(FIGURE_FORMATS)}",
                         hint=f"e.g. --plot {plot.with_suffix('.png')}")
    paths = [plot.with_name(f"{plot.stem}-{f}{plot.suffix}") for f in figures] if figures else [plot]
    for p in paths:
        _writable("--plot", p)
    return paths


def _writable(option: str, path: Path) -> None:
    from ckptprobe.io.writer import check_writable

    try:
        check_writable(path)
    except OSError as e:
        raise UsageError(f"{option} {path}: {e.strerror}") from None


def tolerances(mode, eta: float | None, atol: float | None) -> tuple[float, float]:
    """`(eta, atol)` with their defaults filled in. --eta and --atol are read by one mode each: giving
    one with another mode is a mistake, reported rather than ignored."""
    from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA

    for name, value in (("eta", eta), ("atol", atol)):
        if value is not None and (mode is None or mode.value != name):
            raise UsageError(f"--{name} is read only by --mode {name}"
                             + (f", not by --mode {mode.value}" if mode is not None else ""),
                             hint=f"add --mode {name}, or drop --{name}")
    return (DEFAULT_ETA if eta is None else eta), (DEFAULT_ATOL if atol is None else atol)


def open_sources(refs: Sequence[str], revision: str | None, token: str | None, download: bool) -> list:
    """Open every reference (file, folder or Hub repo) with the same Hub options."""
    from ckptprobe.io.sources import open_source

    return [open_source(r, revision, token, download) for r in refs]


def label(ref: str) -> str:
    """A short name for a checkpoint in tables and legends: its folder or file name, without
    `.safetensors` (a folder's name for `folder/model.safetensors`), or the Hub repo's name and revision."""
    text = ref.rstrip("/")
    if "://" not in text and not Path(text).expanduser().exists() and text.count("/") == 1:
        return text.split("/")[1]  # a Hub repo org/name[@rev]
    p = Path(text)
    generic = p.name in ("model.safetensors", "model.safetensors.index.json") and p.parent.name
    name = p.parent.name if generic else p.name
    return name.removesuffix(".safetensors") or ref


def labels(refs: Sequence[str]) -> list[str]:
    """`label` of each reference, or the references themselves when two labels would be equal."""
    short = [label(r) for r in refs]
    return short if len(set(short)) == len(short) else list(refs)


def configure_threads(threads: int | None) -> int:
    """Apply `--threads` (or the default thread policy) to torch and BLAS."""
    try:
        from ckptprobe._threads import configure
    except ImportError:  # TEMPORARY until the thread policy lands
        return threads or 1
    return configure(threads)


def report_skipped(skipped: Sequence, verbose: bool) -> None:
    """One line on stderr saying what was skipped and why, grouped; every tensor with `verbose`."""
    from ckptprobe.report.output import err

    if not skipped:
        return
    if verbose:
        for s in skipped:
            err.print(f"skipped {s.name}: {s.reason}", highlight=False, markup=False)
        return
    counts = Counter(_kind(s) for s in skipped)
    parts = [f"{n} {kind}" for kind, n in counts.most_common(3)]
    rest = sum(n for _, n in counts.most_common()[3:])
    parts += [f"{rest} for other reasons"] if rest else []
    noun = "tensor" if len(skipped) == 1 else "tensors"
    err.print(f"skipped {len(skipped)} {noun}: {', '.join(parts)}; --verbose lists them", highlight=False,
              markup=False)


def _kind(skipped) -> str:
    """A short, shared label of why a tensor was skipped ("1-D (norms, biases)", "int64 buffer")."""
    kind = getattr(skipped, "kind", None)
    if kind:
        return kind
    reason = skipped.reason
    if reason.startswith("1-D") or "1-D" in reason.split(",")[0]:
        return "1-D (norms, biases)"
    return reason


def emit(out: Output, data: dict, rows: Sequence[dict], tables: Sequence) -> None:
    """Write the result: `tables` (table), `data` (json) or `rows` (csv), to `-o` or stdout."""
    from ckptprobe.report.output import emit as write

    write(out.fmt, data, rows, tables, out.path)


def head_dim_of(base: str) -> int | None:
    """Head size from config.json beside a local base checkpoint (key head_dim, or hidden_size/num_attention_heads)."""
    p = Path(base).expanduser()
    config = (p if p.is_dir() else p.parent) / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg  # multimodal configs nest it
    hd = cfg.get("head_dim")
    if isinstance(hd, int) and hd > 0:
        return hd
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None
