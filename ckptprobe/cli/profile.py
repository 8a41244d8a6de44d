"""`ckptprobe profile BASE CKPT...`: does one run keep updating the same rows and columns over time?"""

from __future__ import annotations

from typing import Annotated

import typer

from ckptprobe.cli._options import AddPrefixOpt, StripPrefixOpt
from ckptprobe.cli._options import (AtolOpt, BaseArg, DownloadOpt, EtaOpt, ExcludeOpt, FormatOpt, HeadDimOpt,
                                    IncludeOpt, LayerOpt, ModeOpt, OutputOpt, PlotOpt, RevisionOpt, SeriesArg,
                                    ThreadsOpt, TokenOpt, VerboseOpt, WorkersOpt)


def profile(
    base: BaseArg,
    checkpoints: SeriesArg,
    layer: LayerOpt = None,
    smooth: Annotated[int, typer.Option(
        "--smooth", min=1, metavar="N",
        help="Moving-average window (entries) applied to each profile; 1 = none. Correlations use the "
             "smoothed profiles.")] = 3,
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
    stripes. JSON holds the profiles themselves.

    Examples:

    `ckptprobe profile base/ ckpt-240/ ckpt-720/ ckpt-1200/ --layer 13 --plot profile.png`

    `ckptprobe profile base/ run/step-*/ --smooth 9 -o profile.json`
    """
    from ckptprobe.analysis.profile import profile as run
    from ckptprobe.cli._common import (check_output, check_plot, configure_threads, emit, expand_series,
                                       head_dim_of, labels, open_sources, pick_layer, report_skipped, tolerances, wrote)
    from ckptprobe.errors import UsageError
    from ckptprobe.report.output import progress_bar, table, warn

    eta, atol = tolerances(mode, eta, atol)
    out = check_output(fmt, output, verbose)
    figures = check_plot(plot)
    configure_threads(threads)
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
    report_skipped(result.skipped, verbose)
    if not result.tensors:
        warn(f"layer {layer} has no matrix in common with the checkpoints")
    names = labels(list(result.checkpoints))
    data = result.to_dict()
    data["labels"] = names
    rows = []
    for t in result.tensors:
        for s, name in enumerate(names):
            rows.append({"module": t.module, "checkpoint": name, "density": _num(t.density[s]),
                         "row_corr": t.row_corr[s - 1] if s else None, "col_corr": t.col_corr[s - 1] if s else None,
                         "row_stripe_index": t.row_stripe_index[s], "col_stripe_index": t.col_stripe_index[s],
                         "name": t.name})
    density_rows = [{"checkpoint": n, "changed": c, "numel": m, "density": d}
                    for n, c, m, d in zip(names, result.changed, result.numel, result.density)]
    shown = [{"module": r["module"], "checkpoint": r["checkpoint"], "density": r["density"],
              "row corr": r["row_corr"], "col corr": r["col_corr"], "row SI": r["row_stripe_index"],
              "col SI": r["col_stripe_index"]} for r in rows]
    tables = [table(f"Update density of each checkpoint vs {result.base}", density_rows),
              table(f"Profiles of layer {layer}", shown, None,
                    f"corr: correlation with the previous checkpoint's profile (moving average over {smooth}); "
                    "SI: stripe index (1 = no structure)")]
    if figures and result.tensors:
        from ckptprobe.report.consensus_plots import plot_profile

        plot_profile(result, names, figures[0], head_dim or head_dim_of(base))
        wrote(figures)
    emit(out, data, rows, tables)


def _num(x: float) -> float | None:
    return None if x != x else float(x)  # NaN (checkpoint lacks the tensor) -> None
