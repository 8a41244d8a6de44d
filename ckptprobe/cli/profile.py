"""`ckptprobe profile BASE CKPT...`: does one run keep updating the same rows and columns over time?"""

from __future__ import annotations

from typing import Annotated

import typer

from ckptprobe.cli._options import (AddPrefixOpt, AtolOpt, BaseArg, By, DownloadOpt, EtaOpt, ExcludeOpt, FormatOpt,
                                    HeadDimOpt, IncludeOpt, LayerOpt, ModeOpt, OutputOpt, PlotOpt, RevisionOpt,
                                    SeriesArg, StripPrefixOpt, ThreadsOpt, TokenOpt, VerboseOpt, WorkersOpt)


def profile(
    base: BaseArg,
    checkpoints: SeriesArg,
    layer: LayerOpt = None,
    smooth: Annotated[int, typer.Option(
        "--smooth", min=1, metavar="N",
        help="Moving-average window (entries) applied to each profile; 1 = none. Correlations use the "
             "smoothed profiles.")] = 3,
    by: Annotated[By, typer.Option("--by", help="Rows of the profile table (and of CSV): one per matrix of "
                                                "the layer, or pooled per module type, layer or group.")] = By.tensor,
    plot: PlotOpt = None,
    head_dim: HeadDimOpt = None,
    mode: ModeOpt = None,
    eta: EtaOpt = None,
    atol: AtolOpt = None,
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
    """One run over time: does the pattern of updated rows and columns persist while the density grows?

    Per checkpoint: the overall update density vs BASE (same rule as `ckptprobe sparsity`), and for each
    matrix of --layer the row ratios (fraction of each row's weights changed) and column ratios, smoothed
    by a moving average. **row corr**/**col corr** is the correlation of a checkpoint's smoothed profile
    with the previous checkpoint's: near 1 means the same rows/columns keep being updated ("The Path Not
    Taken", Fig. 14). **row/col SI**, the stripe index (ours, not the paper's), is the variance of the raw
    ratios over its value for unstructured masks of the same density: ~1 without structure, >> 1 for
    stripes. With --by module/layer/group the layer's matrices are pooled per checkpoint: density from
    summed counts, correlations pooled within matrices (each matrix's profile centred on its own mean),
    stripe indexes the median over matrices. JSON holds the profiles themselves and every grouping.

    Examples:

    `ckptprobe profile base/ ckpt-240/ ckpt-720/ ckpt-1200/ --layer 13 --plot profile.png`

    `ckptprobe profile base/ run/step-*/ --smooth 9 -o profile.json`
    """
    from ckptprobe.cli._common import (check_output, check_plot, configure_threads, emit, expand_series, head_dim_of,
                                       labels, open_sources, pick_layer, report_skipped, require_some, tolerances,
                                       wrote)

    configure_threads(threads, workers)  # before the analysis imports numpy: its BLAS then starts no thread
    from ckptprobe.analysis.profile import profile as run
    from ckptprobe.errors import UsageError
    from ckptprobe.report.output import progress_bar, table, warn

    eta, atol = tolerances(mode, eta, atol)
    out = check_output(fmt, output, verbose)
    figures = check_plot(plot, out)
    a, *sources = open_sources([base, *expand_series(checkpoints, revision, token)], revision, token, download,
                               strip_prefix, add_prefix)
    layer = pick_layer(a, include or (), exclude or (), layer)
    if layer is None:
        raise UsageError("no selected tensor name has a layer index, so there is no layer to profile",
                         hint="check --include/--exclude")
    total_bytes = 2 * sum(a.info(n).nbytes for n in a.keys()) * len(sources)
    with progress_bar("comparing", total_bytes) as advance:
        result = run(a, sources, layer, mode, eta, atol, smooth, include or (), exclude or (), progress=advance,
                     workers=workers)
    require_some([n for n in result.numel if n], result.skipped, verbose, "tensor")  # in no checkpoint
    report_skipped(result.skipped, verbose)
    if not result.tensors:
        warn(f"layer {layer} has no matrix in common with the checkpoints")
    names = labels(list(result.checkpoints))
    data = result.to_dict()
    data["labels"] = names
    rows = result.rows(by.value)
    short = dict(zip(result.checkpoints, names))
    key = "name" if by == By.tensor else by.value  # a module type may name several matrices (experts)
    density_rows = [{"checkpoint": n, "changed": c, "numel": m, "density": d}
                    for n, c, m, d in zip(names, result.changed, result.numel, result.density)]
    shown = [{key: r[key], "checkpoint": short[r["checkpoint"]], "density": r["density"], "row corr": r["row_corr"],
              "col corr": r["col_corr"], "row SI": r["row_stripe_index"], "col SI": r["col_stripe_index"]}
             for r in rows]
    tables = [table(f"Update density of each checkpoint vs {result.base}", density_rows),
              table(f"Profiles of layer {layer}" + ("" if by == By.tensor else f", by {by.value}"), shown, None,
                    f"corr: correlation with the previous checkpoint's profile (moving average over {smooth}"
                    + ("" if by == By.tensor else "; pooled within matrices") + "); SI: stripe index (1 = no structure"
                    + ("" if by == By.tensor else "; median over matrices") + ")")]
    if figures and result.tensors:
        from ckptprobe.report.consensus_plots import plot_profile

        plot_profile(result, names, figures[0], head_dim or head_dim_of(base))
        wrote(figures)
    emit(out, data, rows, tables)
