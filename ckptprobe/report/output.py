"""Where results go: a rich table, JSON or CSV on stdout or into a file (atomically).

stdout carries data only; progress, warnings and hints go to stderr (`err`).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence

from ckptprobe.io.writer import atomic_write

UNBOUNDED = 100_000  # console width for pipes and files: a table is as wide as its content
TEXT_COLUMNS = ("name", "module", "group", "reason", "finding", "checkpoint", "run", "finetuned", "error")


def _console(**kwargs):
    """A console that caps tables at the terminal's width, and at nothing when not on a terminal."""
    from rich.console import Console

    c = Console(soft_wrap=True, **kwargs)
    if not c.is_terminal:
        c = Console(soft_wrap=True, width=UNBOUNDED, **kwargs)
    return c


@functools.cache
def _stream(stderr: bool):
    return _console(stderr=stderr)


def __getattr__(name: str):
    """`out` and `err`, the consoles of stdout and stderr, made on first use: rich costs ~50 ms to
    import, which a run writing JSON or CSV never needs."""
    if name in ("out", "err"):
        return _stream(name == "err")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def warn(message: str) -> None:
    _stream(True).print(f"[yellow]Warning:[/] {message}", highlight=False)


def fmt_num(x, digits: int = 4) -> str:
    """Numbers for tables: ints with thousands separators, floats with `digits` significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        text = f"{x:.{digits}g}"
        while float(text) in (0.0, 1.0, -1.0) and float(text) != x and digits < 12:
            digits += 1  # 0.99999 is not "1", nor is 1e-9 "0": keep digits until it shows
            text = f"{x:.{digits}g}"
        return text
    if isinstance(x, (list, tuple)):
        return "x".join(map(str, x))
    return str(x)


@dataclass(frozen=True)
class Table:
    """A table to show: `rows` (dicts) under `columns`; made into a rich table only when shown."""

    title: str
    rows: Sequence[dict]
    columns: Sequence[str]
    caption: str | None = None

    def rich(self):
        """The rich table. Numbers are never cut: a number column is as wide as its widest cell. On a
        narrow terminal, text columns (names, reasons) wrap instead; off a terminal there is no width
        limit at all."""
        from rich.table import Table as RichTable

        cells = [[fmt_num(r.get(c)) for c in self.columns] for r in self.rows]
        widths = []  # the narrowest each column may get: numbers whole, text wrapped at 24 characters
        for i, c in enumerate(self.columns):
            longest = max([len(c), *(len(row[i]) for row in cells)])
            widths.append(min(longest, 24) if c in TEXT_COLUMNS else longest)
        t = RichTable(title=self.title, caption=self.caption, title_justify="left", caption_justify="left",
                      min_width=sum(widths) + 3 * len(widths) + 1)  # + padding and borders
        for c, w in zip(self.columns, widths):
            if c in TEXT_COLUMNS:
                t.add_column(c, justify="left", overflow="fold", min_width=w)
            else:
                t.add_column(c, justify="right", no_wrap=True, min_width=w)
        for row in cells:
            t.add_row(*row)
        return t

    def text(self) -> str:
        """The table as `rich()` draws it at unbounded width (a pipe, a file), drawn here: rich takes ~1 ms
        a row, which a per-tensor table of a MoE checkpoint (tens of thousands of rows) makes minutes."""
        cells = [[fmt_num(r.get(c)) for c in self.columns] for r in self.rows]
        widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(self.columns)]
        left = [c in TEXT_COLUMNS for c in self.columns]

        def line(values: Sequence[str], bar: str) -> str:
            padded = (v.ljust(w) if text else v.rjust(w) for v, w, text in zip(values, widths, left))
            return f"{bar} " + f" {bar} ".join(padded) + f" {bar}"

        def rule(first: str, fill: str, cross: str, last: str) -> str:
            return first + cross.join(fill * (w + 2) for w in widths) + last

        lines = [self.title] if self.title else []
        lines += [rule("┏", "━", "┳", "┓"), line(self.columns, "┃"), rule("┡", "━", "╇", "┩")]
        lines += [line(row, "│") for row in cells] + [rule("└", "─", "┴", "┘")]
        return "\n".join(lines + ([self.caption] if self.caption else [])) + "\n"


def table(title: str, rows: Sequence[dict], columns: Sequence[str] | None = None, caption: str | None = None) -> Table:
    """A table of `rows` (dicts) with `columns` (default: the first row's keys)."""
    return Table(title, rows, list(columns or (rows[0].keys() if rows else [])), caption)


def show(t: Table, console=None) -> None:
    """Print a table: on a narrow terminal text columns wrap, but numbers are never cut: a table that
    cannot fit is printed wider than the terminal (which then wraps its lines)."""
    if console is None and not sys.stdout.isatty():  # a pipe or a file: nothing to fit, and rich not even loaded
        sys.stdout.write(t.text())
        return
    console = console or _stream(False)
    if console.width >= UNBOUNDED:  # off a terminal (as rich sees it): nothing to wrap, no need for rich's layout
        console.file.write(t.text())
        return
    t = t.rich()
    width = console.width
    if t.min_width and t.min_width > width:
        console.width = t.min_width
    try:
        console.print(t, crop=False)
    finally:
        console.width = width


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN/inf
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        try:  # a list of plain numbers, none NaN/inf (their sum is finite): as it is, without a walk
            if math.isfinite(sum(x)):
                return x
        except (TypeError, OverflowError):  # not all numbers (None, str, lists), or an int beyond float
            pass
        return [_jsonable(v) for v in x]
    return x


def to_json(data: dict) -> str:
    """JSON text with NaN/inf as null, laid out to be read and diffed: a dict one key per line, a
    list of records (dicts) one record per line, anything else on one line. Records and
    numbers go through the json module's C encoder: a result of 100,000 tensors takes seconds."""
    return _layout(_jsonable(data), "") + "\n"


def _layout(x, indent: str) -> str:
    inner = indent + "  "
    if isinstance(x, dict) and x:
        return "{\n" + ",\n".join(f"{inner}{json.dumps(k)}: {_layout(v, inner)}" for k, v in x.items()) + f"\n{indent}}}"
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, dict) for v in x):
        return "[\n" + ",\n".join(inner + json.dumps(v, allow_nan=False) for v in x) + f"\n{indent}]"
    return json.dumps(x, allow_nan=False)


def to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, keys, lineterminator="\n")
        w.writeheader()
        for r in rows:
            r = _jsonable(r)  # NaN/inf -> empty cell, or null inside a list
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buf.getvalue()


def emit(fmt: Format, data: dict, rows: Sequence[dict], tables: Sequence[Table], output: Path | None) -> None:
    """Write `data` (json), `rows` (csv) or `tables` (table) to `output` or stdout."""
    if fmt == Format.table:
        if output:
            with atomic_write(output, "w") as f:
                for t in tables:
                    f.write(t.text())
            print(f"wrote {output}", file=sys.stderr)
        else:
            for t in tables:
                show(t)
        return
    text = to_json(data) if fmt == Format.json else to_csv(rows)
    if output:
        with atomic_write(output, "w") as f:
            f.write(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator:
    """A transient progress bar on stderr (shown only on a terminal); yields `advance(n)`."""
    if not total or not sys.stderr.isatty() or not _stream(True).is_terminal:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=_stream(True), transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)
