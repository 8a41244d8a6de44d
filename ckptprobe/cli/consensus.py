"""`ckptprobe consensus BASE RUN...`: do several runs from one base change the same weights?"""

from __future__ import annotations

from typing import Annotated

import typer

from ckptprobe.cli._options import (AddPrefixOpt, AtolOpt, BaseArg, By, DownloadOpt, EtaOpt, ExcludeOpt, FormatOpt,
                                    HeadDimOpt, IncludeOpt, LayerOpt, ModeOpt, OutputOpt, PlotOpt, RevisionOpt, RunsArg,
                                    StripPrefixOpt, ThreadsOpt, TokenOpt, VerboseOpt, WorkersOpt)

# Table headers (JSON/CSV keep the long names).
SHORT = {"density_mean": "density", "jaccard_mean": "jaccard", "bernoulli_mean": "E(J)", "lift": "lift",
         "all_runs": "all", "all_runs_expected": "E(all)", "row_stripe_index": "row SI",
         "col_stripe_index": "col SI"}


def consensus(
    base: BaseArg,
    runs: RunsArg,
    layer: LayerOpt = None,
    mode: ModeOpt = None,
    eta: EtaOpt = None,
    atol: AtolOpt = None,
    by: Annotated[By, typer.Option("--by", help="Rows of the table (and of CSV).")] = By.module,
    plot: PlotOpt = None,
    head_dim: HeadDimOpt = None,
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
    """Cross-run consensus: do independent runs from one base change the same weights?

    For each run, the update mask M (which weights changed vs BASE; same rule as `ckptprobe sparsity`).
    Then, per tensor, module type and for the whole model:

    - **jaccard**: pairwise overlap |A∩B|/|A∪B| of two runs' masks (mean over pairs), beside **E(J)**, what
      independent runs of the same densities would give, pq/(p+q-pq) (JSON: bernoulli). **lift** =
      jaccard/E(J): 1 means the runs agree no more than chance; "The Path Not Taken" (Fig. 8) reports RL
      runs from one base far above it.

    - **all**: fraction of entries changed by every run, beside **E(all)** for independent runs (exact
      Poisson-binomial); the full histogram over 0..R runs is in JSON.

    - **row/col SI**, the stripe index (ours, not the paper's): variance of the per-row (per-column) mean
      of the consensus C = mean over runs of M, divided by its value for unstructured masks of the same
      densities. ~1 (or below): no structure; >> 1: whole rows (columns) favoured across runs, the stripes
      of Fig. 2.

    Runs that lack a tensor, or hold it with another shape, are left out of that tensor (and reported).
    Memory stays at a few row blocks whatever the model size and number of runs. With --layer (or
    --plot), that layer's matrices also get row/column ratio profiles in JSON; --plot FILE.png writes
    FILE-jaccard.png (the Jaccard matrix beside its baseline), FILE-heatmaps.png and FILE-ratios.png.

    Examples:

    `ckptprobe consensus base/ rl-1/ rl-2/ rl-3/ --plot consensus.png`

    `ckptprobe consensus base/ runs/*/ --layer 13 -o consensus.json`

    `ckptprobe consensus base/ rl-1/ rl-2/ --by tensor --include '*.layers.13.*'`
    """
    from ckptprobe.cli._common import (check_output, check_plot, configure_threads, expand_series, head_dim_of, labels,
                                       open_sources, pick_layer, report_skipped, require_some, tolerances, wrote)

    configure_threads(threads, workers)  # before the analysis imports numpy: its BLAS then starts no thread
    from ckptprobe.analysis.consensus import consensus as run
    from ckptprobe.cli._common import emit as emit_result
    from ckptprobe.errors import UsageError
    from ckptprobe.report.output import fmt_num, progress_bar, table, warn

    runs = expand_series(runs, revision, token)
    if len(runs) < 2:
        raise UsageError(f"consensus needs at least two runs, got {len(runs)}",
                         hint="give the base and two or more fine-tunes of it: ckptprobe consensus BASE RUN1 RUN2 ...")
    eta, atol = tolerances(mode, eta, atol)
    out = check_output(fmt, output, verbose)
    figures = check_plot(plot, out, ("jaccard", "heatmaps", "ratios"))
    a, *sources = open_sources([base, *runs], revision, token, download, strip_prefix, add_prefix)
    if layer is not None or figures:
        layer = pick_layer(a, include or (), exclude or (), layer)
    total_bytes = sum(a.info(n).nbytes for n in a.keys()) * (1 + len(sources))
    with progress_bar("comparing", total_bytes) as advance:
        result = run(a, sources, mode, eta, atol, include or (), exclude or (), layer, progress=advance,
                     workers=workers)
    require_some(result.tensors, result.skipped, verbose, "tensor")
    report_skipped(result.skipped, verbose)
    nonfinite = sum(int(t.nonfinite.sum()) for t in result.tensors)
    if nonfinite:
        warn(f"{nonfinite:,} entries (summed over runs) are NaN/inf in the base or a run; counted as unchanged")

    scope = "selected tensors" if include or exclude else "whole model"
    names = labels(list(result.runs))
    # JSON only: a table or CSV does not need the per-tensor R x R matrices (seconds for many tensors)
    data = {**result.to_dict(), "labels": names} if out.fmt.value == "json" else {}
    total = result.total
    rows = result.rows(by.value)
    cols = ["name", "shape"] if by == By.tensor else [by.value]
    shown = [{**{c: r[c] for c in cols}, **{short: r[key] for key, short in SHORT.items()}} for r in rows]
    caption = "SI: stripe index (1 = no structure); E(.): for independent runs of the same densities"
    if total.jaccard_mean is not None:
        s = total.summary()
        caption = (f"{scope}, {len(names)} runs: mean Jaccard {fmt_num(s['jaccard_mean'])} vs "
                   f"{fmt_num(s['bernoulli_mean'])} for independent runs (lift {fmt_num(s['lift'])}); entries "
                   f"changed by all runs: {fmt_num(s['all_runs'])} (expected {fmt_num(s['all_runs_expected'])}).\n"
                   + caption)
    tables = [table(f"Consensus of {len(names)} runs of {result.base}, by {by.value}", shown, None, caption)]
    if len(names) <= 12 and result.tensors:
        def cell(i: int, j: int) -> str:
            return f"{fmt_num(total.jaccard[i, j], 3)} ({fmt_num(total.bernoulli[i, j], 3)})" if i != j else "-"

        jrows = [{"run": names[i], **{names[j]: cell(i, j) for j in range(len(names))}} for i in range(len(names))]
        tables.append(table(f"Pairwise Jaccard, {scope} (independent-Bernoulli baseline)", jrows))
    if figures and result.tensors:
        from ckptprobe.report.consensus_plots import plot_heatmaps, plot_jaccard, plot_ratios

        hd = head_dim or head_dim_of(base)
        plot_jaccard(total, names, figures[0])
        layer_tensors = result.layer_tensors()
        if layer_tensors:
            plot_heatmaps(layer_tensors, len(names), figures[1], hd, f"Consensus of {len(names)} runs, layer {layer}")
            plot_ratios(layer_tensors, figures[2], hd, f"Row and column ratios of the consensus, layer {layer}")
        else:
            warn(f"layer {layer} has no matrix to plot")
            figures = figures[:1]
        wrote(figures)
    emit_result(out, data, rows, tables)
