"""`ckptprobe principal BASE FT...`: do the updates land on principal or low-magnitude weights?"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ckptprobe.cli._options import (DEFAULT_ALPHA, AddPrefixOpt, AlphaOpt, AtolOpt, BaseArg, By, DeviceOpt, DownloadOpt,
                                    EtaOpt, ExcludeOpt, FinetunedArg, FormatOpt, IncludeOpt, LowOpt, LowThreshold,
                                    ModeOpt, OutputOpt, PlotOpt, RankOpt, RevisionOpt, StripPrefixOpt, ThreadsOpt,
                                    TokenOpt, TopkMethod, TopkMethodOpt, VerboseOpt)


def _cell(counts, mask: str) -> str:
    """overlap/baseline ratio, e.g. "0.0312/0.05 0.624x"."""
    from ckptprobe.report.output import fmt_num

    o, b, r = counts.overlap(mask), counts.baseline(mask), counts.ratio(mask)
    return f"{fmt_num(o, 3)}/{fmt_num(b, 3)}" + (f" {fmt_num(r, 3)}x" if r is not None else "")


def principal(
    base: BaseArg,
    finetuned: FinetunedArg,
    rank: RankOpt = None,
    alpha: AlphaOpt = DEFAULT_ALPHA,
    low_threshold: LowOpt = LowThreshold.alpha,
    mode: ModeOpt = None,
    eta: EtaOpt = None,
    atol: AtolOpt = None,
    by: Annotated[By, typer.Option("--by", help="Rows of the table (and of CSV).")] = By.module,
    plot: PlotOpt = None,
    matrix: Annotated[Optional[str], typer.Option(
        "--matrix", show_default=False, metavar="NAME",
        help="With --plot: the tensor whose masks to draw, e.g. model.layers.1.mlp.up_proj.weight.")] = None,
    device: DeviceOpt = "auto",
    topk_method: TopkMethodOpt = TopkMethod.auto,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    verbose: VerboseOpt = False,
    threads: ThreadsOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
    strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None,
) -> None:
    """Where a fine-tune's updates land: overlap of its update mask M with the base's principal mask
    (largest entries of the rank-k reconstruction |W0^(k)|), low-magnitude mask and principal-but-not-low
    mask, each beside its random baseline.

    overlap = |M & X| / |M|; a random mask of M's size would overlap X by X's density (the baseline), so
    the ratio overlap/baseline < 1 means the updates avoid X. "The Path Not Taken" (Sec. 4.2, Fig. 5): RLVR
    updates are sub-random on principal weights and super-random on low-magnitude ones; SFT's are near 1.
    Only 2-D weight matrices are measured; the rest are skipped (a summary on stderr, the list in
    JSON/CSV and with --verbose). --plot draws the overlap vs its random baseline per layer (Fig. 5) and,
    with --matrix, that matrix's update masks beside its principal mask (Fig. 18).

    Examples:

    `ckptprobe principal ./base ./rl ./sft`

    `ckptprobe principal ./base ./rl --by layer --plot overlap.png --matrix model.layers.1.mlp.up_proj.weight`

    `ckptprobe principal org/base org/rl -k 64 --alpha 0.05 -o principal.json`
    """
    from ckptprobe.analysis.principal import MASKS, check_matrix, matrix_masks, principal_overlap
    from ckptprobe.analysis.svd import resolve_device
    from ckptprobe.cli._common import (check_output, check_plot, configure_threads, emit, open_sources,
                                       report_skipped, require_some, tolerances, wrote)
    from ckptprobe.errors import UsageError
    from ckptprobe.report.output import progress_bar, table

    eta, atol = tolerances(mode, eta, atol)
    out = check_output(fmt, output, verbose)
    figures = check_plot(plot, out)
    if matrix and not plot:
        raise UsageError("--matrix only chooses what --plot draws", hint="add --plot FILE.png")
    dev = resolve_device(device)
    configure_threads(threads)
    src, *fts = open_sources([base, *finetuned], revision, token, download, strip_prefix, add_prefix)
    if matrix:
        check_matrix(src, fts, matrix)
    total_bytes = sum(s.info(n).nbytes for s in (src, *fts) for n in s.keys())
    with progress_bar("measuring", total_bytes) as advance:
        result = principal_overlap(src, fts, rank, alpha, low_threshold, mode, eta, atol, include or (),
                                   exclude or (), dev, topk_method.value, progress=advance)
    require_some(result.matrices, result.skipped, verbose, "matrix")
    report_skipped(result.skipped, verbose)
    data = result.to_dict()
    rows = result.rows(by.value)
    labels = {"principal": "principal", "low": "low", "principal_not_low": "principal & ~low"}
    tables, totals = [], result.total
    for ft in result.finetuned:
        if by == By.tensor:
            groups = {(m.name, m.rank): m.counts for m in result.matrices if m.finetuned == ft}
        else:
            groups = {(k, None): c for k, c in result.by(by.value, ft).items()}
        key = "name" if by == By.tensor else by.value
        trows = [{key: k, **({"k": r} if by == By.tensor else {}), "update density": c.update_density,
                  **{labels[m]: _cell(c, m) for m in MASKS}} for (k, r), c in groups.items()]
        t = totals[ft]
        caption = (f"overall: update density {t.update_density:.4f}; "
                   + "; ".join(f"{labels[m]} {_cell(t, m)}" for m in MASKS)
                   + f". Cells: overlap |M & X|/|M| / random baseline |X|/n, ratio. alpha {result.alpha:g}, "
                   f"k {data['rank']}, low: {result.low_threshold}") if t.numel else None
        cols = [key, *(["k"] if by == By.tensor else []), "update density", *labels.values()]
        tables.append(table(f"Overlap of {ft}'s updates with {result.base}'s masks, by {by.value}", trows, cols,
                            caption))
    if figures:
        from ckptprobe.report.principal_plots import plot_principal

        masks = None
        if matrix:
            masks = matrix_masks(src, fts, matrix, rank, alpha, low_threshold, mode, eta, atol, dev,
                                 topk_method.value)
        plot_principal(result, figures[0], matrix, masks)
        wrote(figures)
    emit(out, data, rows, tables)
