"""`ckptprobe spectrum BASE FT...`: singular values and principal angles of each weight matrix."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ckptprobe.cli._options import (BaseArg, DownloadOpt, ExcludeOpt, FormatOpt, IncludeOpt, OutputOpt,
                                    RevisionOpt, TokenOpt)
from ckptprobe.analysis.svd import TopkMethod
from ckptprobe.errors import UsageError
from ckptprobe.report.output import Format


class By(str, Enum):
    matrix = "matrix"
    module = "module"
    layer = "layer"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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
    finetuned: Annotated[List[str], typer.Argument(
        help="One or more fine-tuned checkpoints (same kinds of reference as BASE), compared side by side.",
        show_default=False, metavar="FT...")],
    k: Annotated[Optional[int], typer.Option(
        "-k", min=1, show_default="64, or a quarter of the smaller side for small matrices",
        help="Size of the top-k singular subspaces whose principal angles are measured.")] = None,
    by: Annotated[By, typer.Option("--by", help="Rows of the table (and of CSV): one per matrix, or means "
                                                "per module type or layer.")] = By.matrix,
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
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", dir_okay=False, help="Draw singular value and principal angle curves of one layer "
                                       "(--layer) and layer x module heatmaps of NSS and max angle "
                                       "(.png, .pdf or .svg).")] = None,
    layer: Annotated[Optional[int], typer.Option(
        "--layer", min=0, show_default="the middle layer", help="The layer whose curves --plot draws.")] = None,
    device: Annotated[Device, typer.Option(
        "--device", help="Where SVDs run: auto picks CUDA when torch sees a GPU.")] = Device.auto,
    max_memory: Annotated[str, typer.Option(
        "--max-memory", help="Budget for one batch of same-shape matrices and their SVD work space "
                             "(on the device): 2GiB, 512MB, ... A single matrix larger than it still runs "
                             "alone.")] = "2GiB",
    topk_method: Annotated[TopkMethod, typer.Option(
        "--topk-method", help="How top-k singular vectors are found. auto: exact; for matrices with a "
                              "side >= 8192 randomized (oversampling + power iterations), except tall ones "
                              "(one side >= 2x the other) whose full spectrum is computed anyway: QR first "
                              "gives exact vectors for less. exact: never randomized (slower on large "
                              "square matrices, and with --fast).")] = TopkMethod.auto,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
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
    present. Tensors that are not 2-D are listed as skipped; a matrix with NaN/inf entries gets an
    error in its row.

    Examples:

    `ckptprobe spectrum base.safetensors ft.safetensors`

    `ckptprobe spectrum ./base ./ft -k 64 --include '*.layers.13.*' --plot spectrum.png`

    `ckptprobe spectrum org/base org/sft org/rl --by module --format json -o spectrum.json`
    """
    from ckptprobe.analysis.pairing import selected
    from ckptprobe.analysis.plan import skip_summary
    from ckptprobe.analysis.spectrum import spectrum as run
    from ckptprobe.analysis.svd import resolve_device
    from ckptprobe.io.names import parse_name
    from ckptprobe.io.sources import open_source
    from ckptprobe.report.output import emit, progress_bar, table, warn

    budget = parse_bytes(max_memory)
    resolve_device(device.value)  # a missing GPU is reported before any checkpoint is opened
    a = open_source(base, revision, token, download)
    fts = [open_source(f, revision, token, download) for f in finetuned]
    names = [n for n in a.keys() if selected(n, include or (), exclude or ()) and len(a.info(n).shape) == 2]
    if layer is not None and not plot:
        warn("--layer only chooses the layer that --plot draws; without --plot it does nothing")
    if plot and layer is not None:
        layers = sorted({parse_name(n).layer for n in names} - {None})
        if layer not in layers:
            raise UsageError(f"--layer {layer}: no selected matrix in that layer"
                             + (f" (layers {layers[0]}..{layers[-1]})" if layers else ""))
    total = sum(a.info(n).nbytes * (1 + len(fts)) for n in names)
    with progress_bar("spectrum", total) as advance:
        result = run(a, fts, k, include or (), exclude or (), device.value, budget, topk_method,
                     fast, bounds, progress=advance)
    if result.skipped:
        warn(skip_summary(result.skipped) + " (listed under Skipped)")
    if not result.matrices:
        warn("no matrix was analysed (check --include/--exclude and the checkpoints' names)")
    for r in result.rows():
        if r["error"]:
            warn(f"{r['name']} ({r['finetuned']}): {r['error']}")
    if plot:
        from ckptprobe.report.spectrum_plots import plot_spectrum

        plot_spectrum(result, plot, layer)
    data = result.to_dict(singular_values)
    several = len(fts) > 1
    metrics = ["nss", "topk_energy_change", "max_angle_u", "max_angle_v"]
    if by == By.matrix:
        rows = result.rows(singular_values)
        cols = ["name"] + (["finetuned"] if several else []) + ["shape", "k"] + metrics
        if bounds:
            cols += ["dw_norm2", "weyl_max_shift", "wedin_bound_deg"]
        else:
            cols += ["mean_angle_u", "mean_angle_v"]
        if any(r["error"] for r in rows):
            cols.append("error")
    else:
        rows = data["groups"][by.value]
        cols = [by.value] + (["finetuned"] if several else []) + ["matrices"] + metrics
    notes = [f"device {result.device}; angles in degrees between top-k subspaces (U: left/output, V: right/input)"]
    randomized = sum(m.randomized for m in result.matrices)
    if randomized:
        notes.append(f"{randomized} large matrices: top-k vectors by randomized SVD")
    if fast and not bounds and any(r["nss_scope"] == "top-k" for r in result.rows()):
        notes.append("--fast: NSS of those matrices over their top-k singular values only")
    title = f"Spectrum of {', '.join(result.finetuned)} vs {result.base}"
    title += "" if by == By.matrix else f", by {by.value}"
    shown = rows
    if several and fmt == Format.table:  # short fine-tune labels in the table; JSON/CSV keep the references
        labels = {ref: Path(ref.rstrip("/")).name.removesuffix(".safetensors") or ref for ref in result.finetuned}
        if len(set(labels.values())) == len(labels):
            shown = [{**r, "finetuned": labels[r["finetuned"]]} for r in rows]
    tables = [table(title, shown, cols, "; ".join(notes))]
    if result.skipped:
        tables.append(table("Skipped", [s.to_dict() for s in result.skipped]))
    emit(fmt, data, rows, tables, output)
