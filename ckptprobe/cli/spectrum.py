"""`ckptprobe spectrum BASE FT...`: singular values and principal angles of each weight matrix."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from ckptprobe.cli._options import (AddPrefixOpt, BaseArg, By, DeviceOpt, DownloadOpt, ExcludeOpt, FinetunedArg,
                                    FormatOpt, IncludeOpt, LayerOpt, OutputOpt, PlotOpt, RevisionOpt, StripPrefixOpt,
                                    SubspaceRankOpt, ThreadsOpt, TokenOpt, TopkMethod, TopkMethodOpt, VerboseOpt)
from ckptprobe.errors import UsageError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1e9' -> bytes; UsageError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m and m[2].upper()
    if not m or unit not in _UNITS or float(m[1]) * _UNITS[unit] < 1:
        raise UsageError(f"--max-memory {text!r}: expected a size such as 2GiB, 512MB or 1e9 (bytes)")
    return int(float(m[1]) * _UNITS[unit])


def spectrum(
    base: BaseArg,
    finetuned: FinetunedArg,
    rank: SubspaceRankOpt = None,
    by: Annotated[By, typer.Option("--by", help="Rows of the table (and of CSV): one per matrix, or pooled per "
                                                "module type, layer or group: NSS over the group's singular "
                                                "values together, top-k energy change of the summed energies, "
                                                "the largest angle, the mean of all angles.")] = By.tensor,
    bounds: Annotated[bool, typer.Option(
        "--bounds", help="Also ||dW||_2 with Weyl's bound max_i |s_i(W1)-s_i(W0)| <= ||dW||_2 and Wedin's "
                         "sin(theta_max) <= ||dW||_2 / delta, delta = s_k(W1) - s_k+1(W0) (or with W0, W1 "
                         "swapped, whichever is larger), to see how tight they are. Costs one more "
                         "singular-value pass per matrix and fine-tune.")] = False,
    fast: Annotated[bool, typer.Option(
        "--fast", help="On large matrices (a side >= 8192: embeddings, lm_head), compute NSS from the "
                       "top-k singular values only, skipping the full spectrum; such rows say "
                       "nss_scope top-k. Ignored with --bounds.")] = False,
    singular_values: Annotated[bool, typer.Option(
        "--singular-values", help="Include every singular value (base and fine-tune) in JSON/CSV.")] = False,
    plot: PlotOpt = None,
    layer: LayerOpt = None,
    device: DeviceOpt = "auto",
    max_memory: Annotated[str, typer.Option(
        "--max-memory", metavar="SIZE",
        help="Budget for one batch of same-shape matrices and their SVD work space "
             "(on the device): 2GiB, 512MB, ... A single matrix larger than it still runs alone.")] = "2GiB",
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
    """Spectrum drift: how much each fine-tune moved every weight matrix's singular values and top-k
    singular subspaces (Sec. 4.1, Fig. 4 of "The Path Not Taken").

    Per 2-D weight: **principal angles** between the top-k left (U) and right (V) singular subspaces
    of base and fine-tune, in degrees (max and mean; all k in JSON); **NSS**, the normalized spectrum
    shift ||s(W1) - s(W0)|| / ||s(W0)|| over all singular values; the **top-k energy change**, the
    relative change of the sum of the top k singular values. RL fine-tunes typically keep NSS near 0
    and angles within a few degrees (the spectrum and principal directions are preserved); SFT
    moves both much more. Angles between top-k subspaces of matrices without a spectral gap at k
    (e.g. random ones) are unstable: compare fine-tunes of one base, not absolute numbers.

    SVDs run in fp32 (bf16 inputs are upcast), batched over same-shape matrices, on CUDA when
    present. Tensors that are not 2-D are skipped (a summary on stderr, the list in JSON/CSV and with
    --verbose); a matrix with NaN/inf entries gets an error in its row. --plot draws the singular value
    and angle curves of one layer (--layer) and layer x module heatmaps of NSS and max angle.

    Examples:

    `ckptprobe spectrum base.safetensors ft.safetensors`

    `ckptprobe spectrum ./base ./ft -k 64 --include '*.layers.13.*' --plot spectrum.png`

    `ckptprobe spectrum org/base org/sft org/rl --by module -o spectrum.json`
    """
    from ckptprobe.analysis.spectrum import spectrum as run
    from ckptprobe.analysis.svd import resolve_device
    from ckptprobe.cli._common import (check_output, check_plot, configure_threads, emit, labels,
                                       open_sources, pick_layer, report_skipped, require_some, wrote)
    from ckptprobe.report.output import progress_bar, table, warn

    out = check_output(fmt, output, verbose)
    figures = check_plot(plot, out)
    if layer is not None and not plot:
        raise UsageError("--layer only chooses the layer that --plot draws", hint="add --plot FILE.png")
    budget = parse_bytes(max_memory)
    resolve_device(device)  # a missing GPU is reported before any checkpoint is opened
    configure_threads(threads)
    a, *fts = open_sources([base, *finetuned], revision, token, download, strip_prefix, add_prefix)
    if plot:
        layer = pick_layer(a, include or (), exclude or (), layer)
    total = sum(a.info(n).nbytes * (1 + len(fts)) for n in a.keys() if len(a.info(n).shape) == 2)
    with progress_bar("spectrum", total) as advance:
        result = run(a, fts, rank, include or (), exclude or (), device, budget, topk_method,
                     fast, bounds, progress=advance)
    require_some(result.matrices, result.skipped, verbose, "matrix")
    report_skipped(result.skipped, verbose)
    for r in result.rows():
        if r["error"]:
            warn(f"{r['name']} ({r['finetuned']}): {r['error']}")
    if figures:
        from ckptprobe.report.spectrum_plots import plot_spectrum

        plot_spectrum(result, figures[0], layer)
        wrote(figures)
    data = result.to_dict(singular_values)
    several = len(fts) > 1
    metrics = ["nss", "topk_energy_change", "max_angle_u", "max_angle_v"]
    rows = result.rows(by.value, singular_values)
    if by == By.tensor:
        cols = ["name"] + (["finetuned"] if several else []) + ["shape", "k"] + metrics
        if bounds:
            cols += ["dw_norm2", "weyl_max_shift", "wedin_bound_deg"]
        else:
            cols += ["mean_angle_u", "mean_angle_v"]
        if any(r["error"] for r in rows):
            cols.append("error")
    else:
        cols = [by.value] + (["finetuned"] if several else []) + ["matrices"] + metrics
    notes = [f"device {result.device}; angles in degrees between top-k subspaces (U: left/output, V: right/input)"]
    randomized = sum(m.randomized for m in result.matrices)
    if randomized:
        notes.append(f"{randomized} large matrices: top-k vectors by randomized SVD")
    if fast and not bounds and any(r["nss_scope"] == "top-k" for r in result.rows()):
        notes.append("--fast: NSS of those matrices over their top-k singular values only")
    title = f"Spectrum of {', '.join(result.finetuned)} vs {result.base}"
    title += "" if by == By.tensor else f", by {by.value}"
    short = dict(zip(result.finetuned, labels(result.finetuned)))  # JSON/CSV keep the references
    shown = [{**r, "finetuned": short[r["finetuned"]]} for r in rows] if several else rows
    emit(out, data, rows, [table(title, shown, cols, "; ".join(notes))])
