"""Where results go: a rich table, JSON or CSV on stdout or into a file (atomically).

stdout carries data only; progress, warnings and hints go to stderr (`err`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence

from rich.console import Console
from rich.table import Table

from ckptprobe.io.writer import atomic_write

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # one warning per line, even in a log file


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/] {message}", highlight=False)


def fmt_num(x, digits: int = 4) -> str:
    """Numbers for tables: ints with thousands separators, floats with `digits` significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    if isinstance(x, (list, tuple)):
        return "x".join(map(str, x))
    return str(x)


def table(title: str, rows: Sequence[dict], columns: Sequence[str] | None = None, caption: str | None = None) -> Table:
    columns = list(columns or (rows[0].keys() if rows else []))
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in ("name", "module", "group", "reason", "finding", "checkpoint") else "right")
    for r in rows:
        t.add_row(*(fmt_num(r.get(c)) for c in columns))
    return t


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN/inf
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def to_json(data: dict) -> str:
    return json.dumps(_jsonable(data), indent=2) + "\n"


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
                c = Console(file=f, width=160, soft_wrap=True)
                for t in tables:
                    c.print(t)
        else:
            for t in tables:
                out.print(t)
        return
    text = to_json(data) if fmt == Format.json else to_csv(rows)
    if output:
        with atomic_write(output, "w") as f:
            f.write(text)
        err.print(f"wrote {output}", highlight=False)
    else:
        sys.stdout.write(text)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator:
    """A transient progress bar on stderr (shown only on a terminal); yields `advance(n)`."""
    if not err.is_terminal or not total:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)
