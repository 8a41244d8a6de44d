"""`ckptprobe drift BASE CKPT...`: relative weight change per module group over a run, lm_head surges."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ckptprobe.cli._options import (BaseArg, DownloadOpt, ExcludeOpt, FormatOpt, IncludeOpt, OutputOpt,
                                    RevisionOpt, TokenOpt)
from ckptprobe.report.output import Format


def drift(
    base: BaseArg,
    checkpoints: Annotated[List[str], typer.Argument(
        help="Checkpoints of one run, in training order (e.g. step-100 step-200 ...).", show_default=False,
        metavar="CKPT...")],
    z: Annotated[float, typer.Option("--z", help="z-score above which an lm_head step counts as a surge.")] = 3.0,
    plot: Annotated[Optional[Path], typer.Option(help="Write a figure (png/pdf/svg) of the drift curves.",
                                                 dir_okay=False)] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Drift over a checkpoint series: how far each module group moved from the base, step by step, and
    whether the lm_head surged.

    Per group (attention, mlp, embedding, head, norm): `||W_t - W_0|| / ||W_0||` (cumulative) and
    `||W_t - W_t-1|| / ||W_t-1||` (per step), Frobenius norms pooled over the group's tensors. A step
    in which the lm_head moved unusually much for how much the body (attention + mlp) moved, a z-score
    outlier (> `--z`) of that ratio against the earlier steps, is flagged as a surge: in RL with
    rollout reuse, lm_head surges precede collapse ("When to Stop Reusing", Sec. 5).

    Examples:

    `ckptprobe drift ./base ./ckpt-100 ./ckpt-200 ./ckpt-300 --plot drift.png`

    `ckptprobe drift $(ckptprobe demo --path base) $(ckptprobe demo --path rl-1-step050) $(ckptprobe demo --path rl-1)`
    """
    from ckptprobe.analysis.drift import drift as run
    from ckptprobe.io.series import expand_refs
    from ckptprobe.io.sources import open_source
    from ckptprobe.report.output import emit, progress_bar, table, warn

    src = open_source(base, revision, token, download)
    series = [open_source(c, revision, token, download) for c in expand_refs(checkpoints, revision, token)]
    total = sum(src.info(n).nbytes for n in src.keys()) * (1 + len(series))
    with progress_bar("reading", total) as advance:
        result = run(src, series, include or (), exclude or (), z, progress=advance)
    for s in result.skipped:
        warn(f"skipped {s.name}: {s.reason}")
    groups = list(result.groups)
    names = [Path(c).name or c for c in result.checkpoints]
    labels = names if len(set(names)) == len(names) else list(result.checkpoints)
    rows = [{"checkpoint": labels[t], **{f"{g}_{kind}": result.groups[g][kind][t] for g in groups
                                 for kind in ("rel_to_base", "rel_step")}}
            for t, c in enumerate(result.checkpoints)]
    tables = [table(f"Relative change {title}, per module group", [
        {"checkpoint": r["checkpoint"], **{g: r[f"{g}_{kind}"] for g in groups}} for r in rows],
        ["checkpoint", *groups]) for title, kind in (("from the base", "rel_to_base"), ("per step", "rel_step"))]
    if result.head:
        tables.append(table(f"lm_head surges ({result.head} step / body step, z > {result.z_threshold:g})",
                            [{**s.to_dict(), "checkpoint": labels[s.index]} for s in result.surges],
                            ["checkpoint", "ratio", "z"], None if result.surges else "none"))
    if plot:
        from ckptprobe.report.drift_plots import plot_drift

        plot_drift(result, plot)
    emit(fmt, result.to_dict(), rows, tables, output)
