"""`ckptprobe consensus BASE RUN...` and `ckptprobe profile BASE CKPT...`: where several runs (or one run
over time) change the weights."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA
from ckptprobe.cli._options import (BaseArg, DownloadOpt, ExcludeOpt, FormatOpt, IncludeOpt, OutputOpt,
                                    RevisionOpt, TokenOpt)
from ckptprobe.cli.sparsity import ModeOpt
from ckptprobe.report.output import Format

MAX_WARNINGS = 20
# Table headers (JSON/CSV keep the long names).
SHORT = {"density_mean": "density", "jaccard_mean": "jaccard", "bernoulli_mean": "E(J)", "lift": "lift",
         "all_runs": "all", "all_runs_expected": "E(all)", "row_stripe_index": "row SI",
         "col_stripe_index": "col SI"}


class By(str, Enum):
    tensor = "tensor"
    module = "module"
    layer = "layer"


EtaOpt = Annotated[float, typer.Option(help="Relative tolerance for --mode eta.", min=0)]
AtolOpt = Annotated[float, typer.Option(help="Absolute tolerance for --mode atol.", min=0)]
HeadDimOpt = Annotated[Optional[int], typer.Option(
    "--head-dim", min=1, show_default="from config.json beside BASE (head_dim, or hidden_size/num_attention_heads)",
    help="Attention head size, to mark head boundaries in plots.")]


def label(ref: str) -> str:
    """A short name for a checkpoint in tables and legends: its folder or file name without .safetensors."""
    p = Path(ref.rstrip("/"))
    generic = p.name in ("model.safetensors", "model.safetensors.index.json") and p.parent.name
    name = p.parent.name if generic else p.name
    return name.removesuffix(".safetensors") or ref


def labels(refs: list[str]) -> list[str]:
    short = [label(r) for r in refs]
    return short if len(set(short)) == len(short) else list(refs)


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


def _warn_skipped(skipped) -> None:
    from ckptprobe.report.output import warn

    for s in skipped[:MAX_WARNINGS]:
        warn(f"skipped {s.name}: {s.reason}")
    if len(skipped) > MAX_WARNINGS:
        warn(f"... and {len(skipped) - MAX_WARNINGS} more skipped (all are listed in --format json)")


def consensus(
    base: BaseArg,
    runs: Annotated[List[str], typer.Argument(
        help="Two or more fine-tunes of BASE (independent runs), same kinds of reference as BASE.",
        show_default=False, metavar="RUN...")],
    layer: Annotated[Optional[int], typer.Option(
        "--layer", "-l", show_default="the middle layer when plotting, else none",
        help="Layer whose matrices get row/column ratio profiles (in JSON) and heatmaps (with --plot).")] = None,
    mode: ModeOpt = None,
    eta: EtaOpt = DEFAULT_ETA,
    atol: AtolOpt = DEFAULT_ATOL,
    by: Annotated[By, typer.Option("--by", help="Rows of the table (and of CSV).")] = By.module,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", file_okay=False, help="Write figures into this folder: heatmaps and ratio profiles of --layer, "
                                        "and the Jaccard matrix beside its baseline.")] = None,
    head_dim: HeadDimOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
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
    Memory stays at a few row blocks whatever the model size and number of runs.

    Examples:

    `ckptprobe consensus base/ rl-1/ rl-2/ rl-3/ --plot consensus/`

    `ckptprobe consensus base/ runs/*/ --layer 13 --format json -o consensus.json`

    `ckptprobe consensus base/ rl-1/ rl-2/ --by tensor --include '*.layers.13.*'`
    """
    from ckptprobe.analysis.consensus import consensus as run
    from ckptprobe.analysis.consensus import layers_of
    from ckptprobe.errors import UsageError
    from ckptprobe.io.series import expand_refs
    from ckptprobe.io.sources import open_source
    from ckptprobe.report.output import emit, err, fmt_num, progress_bar, table, warn

    runs = expand_refs(runs, revision, token)
    if len(runs) < 2:
        raise UsageError(f"consensus needs at least two runs, got {len(runs)}",
                         hint="give the base and two or more fine-tunes of it: ckptprobe consensus BASE RUN1 RUN2 ...")
    a = open_source(base, revision, token, download)
    sources = [open_source(r, revision, token, download) for r in runs]
    if layer is None and plot is not None:
        layers = layers_of(a, include or (), exclude or ())
        layer = layers[len(layers) // 2] if layers else None
    total_bytes = sum(a.info(n).nbytes for n in a.keys()) * (1 + len(sources))
    with progress_bar("comparing", total_bytes) as advance:
        result = run(a, sources, mode, eta, atol, include or (), exclude or (), layer, progress=advance)
    _warn_skipped(result.skipped)
    nonfinite = sum(int(t.nonfinite.sum()) for t in result.tensors)
    if nonfinite:
        warn(f"{nonfinite:,} entries (summed over runs) are NaN/inf in the base or a run; counted as unchanged")
    if not result.tensors:
        warn("no tensor was compared (check --include/--exclude and the checkpoints' names)")

    names = labels(list(result.runs))
    data = result.to_dict()
    data["labels"] = names
    total = result.total
    if by == By.tensor:
        rows = [t.summary() for t in result.tensors]
        cols = ["name", "shape"]
    else:
        rows = [g.summary(by.value) for g in result.by(by.value).values()]
        cols = [by.value]
    shown = [{**{c: r[c] for c in cols}, **{short: _round(r[key]) for key, short in SHORT.items()}} for r in rows]
    caption = "SI: stripe index (1 = no structure); E(.): for independent runs of the same densities"
    if total.jaccard_mean is not None:
        s = total.summary()
        caption = (f"whole model, {len(names)} runs: mean Jaccard {fmt_num(s['jaccard_mean'])} vs "
                   f"{fmt_num(s['bernoulli_mean'])} for independent runs (lift {fmt_num(s['lift'])}); entries "
                   f"changed by all runs: {fmt_num(s['all_runs'])} (expected {fmt_num(s['all_runs_expected'])}).\n"
                   + caption)
    tables = [table(f"Consensus of {len(names)} runs of {result.base}, by {by.value}", shown, None, caption)]
    if len(names) <= 12 and result.tensors:
        def cell(i: int, j: int) -> str:
            return f"{fmt_num(total.jaccard[i, j], 3)} ({fmt_num(total.bernoulli[i, j], 3)})" if i != j else "-"

        jrows = [{"run": names[i], **{names[j]: cell(i, j) for j in range(len(names))}} for i in range(len(names))]
        tables.append(table("Pairwise Jaccard, whole model (independent-Bernoulli baseline)", jrows))
    if result.skipped:
        tables.append(table("Skipped", [s.to_dict() for s in result.skipped]))

    if plot is not None and result.tensors:
        from ckptprobe.report.consensus_plots import plot_heatmaps, plot_jaccard, plot_ratios

        hd = head_dim or head_dim_of(base)
        written = [plot / "jaccard.png"]
        plot_jaccard(total, names, written[0])
        layer_tensors = result.layer_tensors()
        if layer_tensors:
            written += [plot / f"heatmaps_layer{layer}.png", plot / f"ratios_layer{layer}.png"]
            plot_heatmaps(layer_tensors, len(names), written[1], hd, f"Consensus of {len(names)} runs, layer {layer}")
            plot_ratios(layer_tensors, written[2], hd, f"Row and column ratios of the consensus, layer {layer}")
        elif layer is not None:
            warn(f"layer {layer} has no matrix to plot")
        for p in written:
            err.print(f"wrote {p}", highlight=False)
    emit(fmt, data, rows, tables, output)


def _round(x: float | None) -> float | None:
    """3 significant digits, so that a 10-column table fits 80 characters."""
    return None if x is None else float(f"{x:.3g}")


def profile(
    base: BaseArg,
    checkpoints: Annotated[List[str], typer.Argument(
        help="Checkpoints of one run, in step order (e.g. ckpt-240 ckpt-720 ckpt-1200).", show_default=False,
        metavar="CKPT...")],
    layer: Annotated[Optional[int], typer.Option(
        "--layer", "-l", show_default="the middle layer", help="Layer whose matrices are profiled.")] = None,
    smooth: Annotated[int, typer.Option(
        help="Moving-average window (entries) applied to each profile; 1 = none. Correlations use the "
             "smoothed profiles.", min=1)] = 3,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", dir_okay=False, help="Write the profiles figure here (.png, .pdf or .svg).")] = None,
    head_dim: HeadDimOpt = None,
    mode: ModeOpt = None,
    eta: EtaOpt = DEFAULT_ETA,
    atol: AtolOpt = DEFAULT_ATOL,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
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

    `ckptprobe profile base/ run/step-*/ --smooth 9 --format json -o profile.json`
    """
    from ckptprobe.analysis.consensus import layers_of
    from ckptprobe.analysis.profile import profile as run
    from ckptprobe.errors import UsageError
    from ckptprobe.io.series import expand_refs
    from ckptprobe.io.sources import open_source
    from ckptprobe.report.output import emit, err, progress_bar, table, warn

    a = open_source(base, revision, token, download)
    sources = [open_source(c, revision, token, download) for c in expand_refs(checkpoints, revision, token)]
    if layer is None:
        layers = layers_of(a, include or (), exclude or ())
        if not layers:
            raise UsageError("no tensor name has a layer index, so there is no layer to profile",
                             hint="check --include/--exclude")
        layer = layers[len(layers) // 2]
    total_bytes = 2 * sum(a.info(n).nbytes for n in a.keys()) * len(sources)
    with progress_bar("comparing", total_bytes) as advance:
        result = run(a, sources, layer, mode, eta, atol, smooth, include or (), exclude or (), progress=advance)
    _warn_skipped(result.skipped)
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
    if result.skipped:
        tables.append(table("Skipped", [s.to_dict() for s in result.skipped]))
    if plot is not None and result.tensors:
        from ckptprobe.report.consensus_plots import plot_profile

        plot_profile(result, names, plot, head_dim or head_dim_of(base))
        err.print(f"wrote {plot}", highlight=False)
    emit(fmt, data, rows, tables, output)


def _num(x: float) -> float | None:
    return None if x != x else float(x)  # NaN (checkpoint lacks the tensor) -> None
