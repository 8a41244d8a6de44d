"""`ckptprobe demo`: every analysis on the shipped example family, with a one-line reading of each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ckptprobe.cli._options import FormatOpt, OutputOpt
from ckptprobe.report.output import Format


def demo(
    path: Annotated[Optional[str], typer.Option(
        "--path", help="Print the folder of one shipped checkpoint (base, sft, rl-1, ...) and exit, "
                       "for use in other commands.", metavar="NAME")] = None,
    rebuild: Annotated[Optional[Path], typer.Option(
        help="Train the family again into this folder (a few minutes on CPU), then report on it.",
        file_okay=False)] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write the figures into this folder.", file_okay=False)] = None,
    rank: Annotated[int, typer.Option("--rank", "-k", help="k for principal masks and principal angles.", min=1)] = 8,
    alpha: Annotated[float, typer.Option(help="Fraction of entries in the principal and low masks.", min=0, max=1)] = 0.05,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
) -> None:
    """Run every analysis on the built-in example family and say what each finding means.

    The family ships inside the package: a 2-layer Llama-style model pretrained on addition (`base`),
    fine-tuned with SFT on subtraction (`sft`) and with GRPO from three seeds (`rl-1`, `rl-2`, `rl-3`;
    `rl-1` also at steps 50, 100, 150), all stored in bf16. The report compares SFT with RL on update
    sparsity, agreement between RL runs, overlap with principal and low-magnitude weights, spectrum
    shift and principal angles, and rl-1's drift; then whether rl-1's recipe and seed, run from the base
    with layer 1 scrambled (`ckptprobe scramble`: same function, other coordinates), still update the
    same coordinates as rl-1 (`base-scrambled`, `rl-1-scrambled`).

    Examples:

    `ckptprobe demo`

    `ckptprobe demo --plot figures/ --format json -o demo.json`

    `ckptprobe sparsity $(ckptprobe demo --path base) $(ckptprobe demo --path rl-1)`
    """
    from ckptprobe import examples

    if path:
        print(examples.path(path))
        return
    from ckptprobe.examples._findings import findings
    from ckptprobe.report.output import emit, err, table

    if rebuild:
        with err.status("training the example family") as status:
            examples.rebuild(rebuild, progress=lambda line: status.update(line))
    with err.status("measuring") as status:
        result = findings(rebuild, rank, alpha, progress=lambda step: status.update(f"measuring: {step}"))
    main = [f for f in result.items if not f.key.startswith("scramble_")]
    rows = [{"finding": f.title, "SFT": f.sft, "RL (mean of 3)": f.rl, "chance / none": f.baseline} for f in main]
    readings = "\n".join(f"- {f.reading}" for f in main)
    tables = [table(f"SFT vs RL on the example family ({result.root})", rows,
                    ["finding", "SFT", "RL (mean of 3)", "chance / none"], readings)]
    scr = [f for f in result.items if f.key.startswith("scramble_")]
    scr_rows = [{"layer": f.title.rsplit("layer ", 1)[1], "overlap": f.rl, "chance": f.baseline,
                 "Jaccard": f.rl_runs["jaccard"], "Bernoulli": f.rl_runs["bernoulli"],
                 "rl-2 overlap": f.rl_runs["rl-2"]} for f in scr]
    tables.append(table("Scrambled base: rl-1-scrambled's update mask vs rl-1's, same coordinates", scr_rows,
                        ["layer", "overlap", "chance", "Jaccard", "Bernoulli", "rl-2 overlap"],
                        "\n".join(f"- {f.reading}" for f in scr)))
    if plot:
        _plots(result, plot)
        err.print(f"wrote figures to {plot}/", highlight=False)
    emit(fmt, result.to_dict(), [f.to_dict() for f in result.items], tables, output)


def _plots(result, folder: Path) -> None:
    import json

    from ckptprobe.report.consensus_plots import plot_heatmaps, plot_jaccard, plot_ratios
    from ckptprobe.report.drift_plots import plot_drift
    from ckptprobe.report.principal_plots import plot_principal
    from ckptprobe.report.spectrum_plots import plot_spectrum

    cons = result.results["consensus"]
    head_dim = json.loads((Path(result.root) / "base" / "config.json").read_text()).get("head_dim")
    plot_spectrum(result.results["spectrum"], folder / "spectrum.png")
    plot_principal(result.results["principal"], folder / "principal.png")
    plot_jaccard(cons.total, [Path(r).name for r in cons.runs], folder / "jaccard.png")
    plot_heatmaps(cons.layer_tensors(), len(cons.runs), folder / "consensus_heatmaps.png", head_dim)
    plot_ratios(cons.layer_tensors(), folder / "consensus_ratios.png", head_dim)
    plot_drift(result.results["drift"], folder / "drift.png")
