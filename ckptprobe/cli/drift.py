"""`ckptprobe drift BASE CKPT...`: relative weight change per module group over a run, lm_head surges."""

from __future__ import annotations

from typing import Annotated

import typer

from ckptprobe.cli._options import (AddPrefixOpt, BaseArg, By, DownloadOpt, ExcludeOpt, FormatOpt, IncludeOpt,
                                    OutputOpt, PlotOpt, RevisionOpt, SeriesArg, StripPrefixOpt, ThreadsOpt, TokenOpt,
                                    VerboseOpt, WorkersOpt, ZOpt)


def drift(
    base: BaseArg,
    checkpoints: SeriesArg,
    z: ZOpt = 3.0,
    by: Annotated[By, typer.Option("--by", help="Rows of the tables (and of CSV): one per tensor, or pooled "
                                                "per module type, layer or group.")] = By.group,
    plot: PlotOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    verbose: VerboseOpt = False,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
    strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None,
) -> None:
    """Drift over a checkpoint series: how far each module group moved from the base, step by step, and
    whether the lm_head surged.

    Per group (attention, mlp, embedding, head, norm; or per tensor, module type or layer with --by):
    `||W_t - W_0|| / ||W_0||` (cumulative) and `||W_t - W_t-1|| / ||W_t-1||` (per step), Frobenius norms
    pooled over the group's tensors (sums of squares). A ratio against a reference that is zero at its
    dtype's resolution (root-mean-square below the dtype's smallest normal number, such as zero-initialised
    biases) is undefined: "-" in tables, empty in CSV, null in JSON; such a tensor still counts in its
    group's pooled norms. CSV has one row per tensor (or group) and checkpoint, with the norms. A step
    in which the lm_head moved unusually much for how much the body (attention + mlp) moved, a z-score
    outlier (> `--z`) of that ratio against the earlier steps, is flagged as a surge: in RL with
    rollout reuse, lm_head surges precede collapse ("When to Stop Reusing", Sec. 5).

    Examples:

    `ckptprobe drift ./base ./ckpt-100 ./ckpt-200 ./ckpt-300 --plot drift.png`

    `ckptprobe drift $(ckptprobe demo --path base) $(ckptprobe demo --path rl-1-step050) $(ckptprobe demo --path rl-1)`
    """
    from ckptprobe.cli._common import (check_output, check_plot, configure_threads, emit, expand_series, labels,
                                       open_sources, report_skipped, require_some, wrote)

    configure_threads(threads, workers)  # before the analysis imports numpy: its BLAS then starts no thread
    from ckptprobe.analysis.drift import drift as run
    from ckptprobe.report.output import progress_bar, table, warn

    out = check_output(fmt, output, verbose)
    figures = check_plot(plot, out)
    src, *series = open_sources([base, *expand_series(checkpoints, revision, token)], revision, token, download,
                                strip_prefix, add_prefix)
    total = sum(src.info(n).nbytes for n in src.keys()) * (1 + len(series))
    with progress_bar("reading", total) as advance:
        result = run(src, series, include or (), exclude or (), z, progress=advance, workers=workers)
    require_some(result.tensors, result.skipped, verbose, "tensor")
    report_skipped(result.skipped, verbose)
    names = labels(result.checkpoints)
    rows = result.rows(by.value)
    key = "name" if by == By.tensor else by.value
    T = len(names)
    bad = result.nonfinite
    if bad:
        warn(f"{len(bad)} tensor(s) hold NaN/inf in the base or a checkpoint, e.g. {bad[0]}: their norms and "
             "the ratios of their groups are NaN or inf")
    undefined = any(r[kind] != r[kind] for r in rows for kind in ("rel_to_base", "rel_step"))  # NaN
    caption = None if not undefined else "-: undefined, " + ("NaN/inf entries (see the warning) or " if bad else "") \
        + "the reference is zero at its dtype's resolution"
    tables = [table(f"Relative change {title}, by {by.value}", [
        {key: rows[i][key], **{names[t]: rows[i + t][kind] for t in range(T)}} for i in range(0, len(rows), T)],
        [key, *names], caption) for title, kind in (("from the base", "rel_to_base"), ("per step", "rel_step"))]
    if result.head:
        tables.append(table(f"lm_head surges ({result.head} step / body step, z > {result.z_threshold:g})",
                            [{**s.to_dict(), "checkpoint": names[s.index]} for s in result.surges],
                            ["checkpoint", "ratio", "z"], None if result.surges else "none"))
    else:
        warn("no lm_head or embedding among the compared tensors: no surge check (see --include/--exclude)")
    if figures:
        from ckptprobe.report.drift_plots import plot_drift

        plot_drift(result, figures[0])
        wrote(figures)
    emit(out, result.to_dict(), rows, tables)
