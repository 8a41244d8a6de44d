"""`ckptprobe principal BASE FT...`: do the updates land on principal or low-magnitude weights?"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ckptprobe.analysis.mask_select import DEFAULT_ALPHA, LowThreshold
from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA
from ckptprobe.cli._options import (BaseArg, DownloadOpt, ExcludeOpt, FormatOpt, IncludeOpt, OutputOpt,
                                    RevisionOpt, TokenOpt)
from ckptprobe.cli.masks import AlphaOpt, DeviceOpt, LowOpt, RankOpt, TopkMethod, TopkMethodOpt
from ckptprobe.cli.sparsity import ModeOpt
from ckptprobe.report.output import Format


class By(str, Enum):
    tensor = "tensor"
    module = "module"
    layer = "layer"


def _cell(counts, mask: str) -> str:
    """overlap/baseline ratio, e.g. "0.031/0.050 0.62x"."""
    o, b, r = counts.overlap(mask), counts.baseline(mask), counts.ratio(mask)
    text = ("-" if o is None else f"{o:.3f}") + ("/-" if b is None else f"/{b:.3f}")
    return text + (f" {r:.2f}x" if r is not None else "")


def principal(
    base: BaseArg,
    finetuned: Annotated[List[str], typer.Argument(
        help="Fine-tuned checkpoints of BASE (same kinds of reference), each compared on its own.",
        show_default=False, metavar="FT...")],
    rank: RankOpt = None,
    alpha: AlphaOpt = DEFAULT_ALPHA,
    low_threshold: LowOpt = LowThreshold.alpha,
    mode: ModeOpt = None,
    eta: Annotated[float, typer.Option(help="Relative tolerance for --mode eta.", min=0)] = DEFAULT_ETA,
    atol: Annotated[float, typer.Option(help="Absolute tolerance for --mode atol.", min=0)] = DEFAULT_ATOL,
    by: Annotated[By, typer.Option("--by", help="Rows of the table (and of CSV).")] = By.module,
    plot: Annotated[Optional[Path], typer.Option(
        help="Write a figure (png/pdf/svg): overlap vs random baseline per layer (Fig. 5); with --matrix, also "
             "that matrix's update masks beside its principal mask (Fig. 18).", dir_okay=False)] = None,
    matrix: Annotated[Optional[str], typer.Option(
        "--matrix", show_default=False, help="With --plot: the tensor name whose masks to draw, e.g. "
                                             "model.layers.1.mlp.up_proj.weight.")] = None,
    device: DeviceOpt = "auto",
    topk_method: TopkMethodOpt = TopkMethod.auto,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Where a fine-tune's updates land: overlap of its update mask M with the base's principal mask
    (largest entries of the rank-k reconstruction |W0^(k)|), low-magnitude mask and principal-but-not-low
    mask, each beside its random baseline.

    overlap = |M & X| / |M|; a random mask of M's size would overlap X by X's density (the baseline), so
    the ratio overlap/baseline < 1 means the updates avoid X. "The Path Not Taken" (Sec. 4.2, Fig. 5): RLVR
    updates are sub-random on principal weights and super-random on low-magnitude ones; SFT's are near 1.
    Only 2-D weight matrices are measured; the rest are listed as skipped.

    Examples:

    `ckptprobe principal ./base ./rl ./sft`

    `ckptprobe principal ./base ./rl --by layer --plot overlap.png --matrix model.layers.1.mlp.up_proj.weight`

    `ckptprobe principal org/base org/rl -k 64 --alpha 0.05 --format json -o principal.json`
    """
    from ckptprobe.analysis.plan import skip_summary
    from ckptprobe.analysis.principal import MASKS, check_matrix, matrix_masks, principal_overlap
    from ckptprobe.analysis.svd import resolve_device
    from ckptprobe.errors import UsageError
    from ckptprobe.io.sources import open_source
    from ckptprobe.report.output import emit, progress_bar, table, warn

    if matrix and not plot:
        raise UsageError("--matrix only chooses what --plot draws", hint="add --plot FILE.png")
    dev = resolve_device(device)
    src = open_source(base, revision, token, download)
    fts = [open_source(f, revision, token, download) for f in finetuned]
    if matrix:
        check_matrix(src, fts, matrix)
    total_bytes = sum(s.info(n).nbytes for s in (src, *fts) for n in s.keys())
    with progress_bar("measuring", total_bytes) as advance:
        result = principal_overlap(src, fts, rank, alpha, low_threshold, mode, eta, atol, include or (),
                                   exclude or (), dev, topk_method.value, progress=advance)
    if result.skipped:
        warn(skip_summary(result.skipped) + " (listed in --format json)")
    if not result.matrices:
        warn("no matrix was measured (check --include/--exclude and the checkpoints' names)")
    data = result.to_dict()
    rows = data["matrices"] if by == By.tensor else data["groups"][by.value]
    labels = {"principal": "principal", "low": "low", "principal_not_low": "principal & ~low"}
    tables = []
    for ft in result.finetuned:
        if by == By.tensor:
            groups = {(m.name, m.rank): m.counts for m in result.matrices if m.finetuned == ft}
        else:
            groups = {(k, None): c for k, c in result.by(by.value, ft).items()}
        key = "name" if by == By.tensor else by.value
        trows = [{key: k, **({"k": r} if by == By.tensor else {}), "update density": c.update_density,
                  **{labels[m]: _cell(c, m) for m in MASKS}} for (k, r), c in groups.items()]
        t = result.total(ft)
        caption = (f"overall: update density {t.update_density:.4f}; "
                   + "; ".join(f"{labels[m]} {_cell(t, m)}" for m in MASKS)
                   + f". Cells: overlap |M & X|/|M| / random baseline |X|/n, ratio. alpha {result.alpha:g}, "
                   f"k {data['rank']}, low: {result.low_threshold}") if t.numel else None
        cols = [key, *(["k"] if by == By.tensor else []), "update density", *labels.values()]
        tables.append(table(f"Overlap of {ft}'s updates with {result.base}'s masks, by {by.value}", trows, cols,
                            caption))
    if result.skipped:
        tables.append(table("Skipped", [s.to_dict() for s in result.skipped]))
    if plot:
        from ckptprobe.report.principal_plots import plot_principal

        masks = None
        if matrix:
            masks = matrix_masks(src, fts, matrix, rank, alpha, low_threshold, mode, eta, atol, dev,
                                 topk_method.value)
        plot_principal(result, plot, matrix, masks)
    emit(fmt, data, rows, tables, output)
