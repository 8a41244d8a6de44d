"""`ckptprobe demo`: every analysis on the shipped example family, with a one-line reading of each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ckptprobe.cli._options import DEFAULT_ALPHA, AlphaOpt, FormatOpt, OutputOpt, PlotOpt, RankOpt, ThreadsOpt

FIGURES = ("spectrum", "principal", "jaccard", "consensus-heatmaps", "consensus-ratios", "drift")


def demo(
    path: Annotated[Optional[str], typer.Option(
        "--path", help="Print the folder of one shipped checkpoint (base, sft, rl-1, ...) and exit, "
                       "for use in other commands.", metavar="NAME")] = None,
    rebuild: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Train the family again into this folder (a few minutes on CPU), then report on it.",
        file_okay=False)] = None,
    plot: PlotOpt = None,
    rank: RankOpt = None,
    alpha: AlphaOpt = DEFAULT_ALPHA,
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Run every analysis on the built-in example family and say what each finding means.

    The family ships inside the package: a 2-layer Llama-style model pretrained on addition (`base`),
    fine-tuned with SFT on subtraction (`sft`) and with GRPO from three seeds (`rl-1`, `rl-2`, `rl-3`;
    `rl-1` also at steps 50, 100, 150), all stored in bf16. The report compares SFT with RL on update
    sparsity, agreement between RL runs, overlap with principal and low-magnitude weights, spectrum
    shift and principal angles, and rl-1's drift; then whether rl-1's recipe and seed, run from the base
    with layer 1 scrambled (`ckptprobe scramble`: same function, other coordinates), still update the
    same coordinates as rl-1 (`base-scrambled`, `rl-1-scrambled`). k (-k) defaults to 8 here, the rule of `principal`
    for these 128-wide matrices. --plot FILE.png writes FILE-spectrum.png, FILE-principal.png,
    FILE-jaccard.png, FILE-consensus-heatmaps.png, FILE-consensus-ratios.png and FILE-drift.png.

    Examples:

    `ckptprobe demo`

    `ckptprobe demo --plot figures/demo.png -o demo.json`

    `ckptprobe sparsity $(ckptprobe demo --path base) $(ckptprobe demo --path rl-1)`
    """
    from ckptprobe import examples
    from ckptprobe.cli._common import check_output, check_plot, configure_threads, emit, writable, wrote

    if path:
        print(examples.path(path))
        return
    out = check_output(fmt, output)
    figures = check_plot(plot, out, FIGURES)
    if rebuild:  # before minutes of training: the family is written there at the end
        writable("--rebuild", rebuild / "base" / "model.safetensors")
    configure_threads(threads)
    from ckptprobe.examples._findings import findings
    from ckptprobe.report.output import err, table

    if rebuild:
        with err.status("training the example family") as status:
            examples.rebuild(rebuild, progress=lambda line: status.update(line))
    with err.status("measuring") as status:
        result = findings(rebuild, rank or 8, alpha, progress=lambda step: status.update(f"measuring: {step}"))
    main = [f for f in result.items if not f.key.startswith("scramble_")]
    rows = [{"finding": f.title, "SFT": f.sft, "RL (mean of 3)": f.rl, "chance / none": f.baseline} for f in main]
    readings = "\n".join(f"- {f.reading}" for f in main)
    tables = [table(f"SFT vs RL on the example family ({result.root})", rows,
                    ["finding", "SFT", "RL (mean of 3)", "chance / none"], readings)]
    scr = [f for f in result.items if f.key.startswith("scramble_")]
    scr_rows = [{"layer": f.title.rsplit("layer ", 1)[1], "overlap": f.rl, "chance": f.baseline,
                 "Jaccard": f.detail["jaccard"], "Bernoulli": f.detail["bernoulli"],
                 "rl-2 overlap": f.rl_runs["rl-2"]} for f in scr]
    tables.append(table("Scrambled base: rl-1-scrambled's update mask vs rl-1's, same coordinates", scr_rows,
                        ["layer", "overlap", "chance", "Jaccard", "Bernoulli", "rl-2 overlap"],
                        "\n".join(f"- {f.reading}" for f in scr)))
    if figures:
        _plots(result, dict(zip(FIGURES, figures)))
        wrote(figures)
    emit(out, result.to_dict(), [f.to_dict() for f in result.items], tables)


def _plots(result, files: dict) -> None:
    from ckptprobe.cli._common import head_dim_of
    from ckptprobe.report.consensus_plots import plot_heatmaps, plot_jaccard, plot_ratios
    from ckptprobe.report.drift_plots import plot_drift
    from ckptprobe.report.labels import labels
    from ckptprobe.report.principal_plots import plot_principal
    from ckptprobe.report.spectrum_plots import plot_spectrum

    cons = result.results["consensus"]
    head_dim = head_dim_of(str(Path(result.root) / "base"))
    plot_spectrum(result.results["spectrum"], files["spectrum"])
    plot_principal(result.results["principal"], files["principal"])
    plot_jaccard(cons.total, labels(cons.runs), files["jaccard"])
    plot_heatmaps(cons.layer_tensors(), len(cons.runs), files["consensus-heatmaps"], head_dim)
    plot_ratios(cons.layer_tensors(), files["consensus-ratios"], head_dim)
    plot_drift(result.results["drift"], files["drift"])
