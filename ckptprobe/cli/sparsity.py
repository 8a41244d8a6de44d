"""`ckptprobe sparsity BASE FT`: the fraction of weights a fine-tune left unchanged."""

from __future__ import annotations

from typing import Annotated

import typer

from ckptprobe.cli._options import (AddPrefixOpt, AtolOpt, BaseArg, By, DownloadOpt, EtaOpt, ExcludeOpt, FormatOpt,
                                    IncludeOpt, ModeOpt, OutputOpt, RevisionOpt, StripPrefixOpt, ThreadsOpt, TokenOpt,
                                    VerboseOpt, WorkersOpt)


def sparsity(
    base: BaseArg,
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (same kinds of reference as BASE).",
                                             show_default=False, metavar="FT")],
    mode: ModeOpt = None,
    eta: EtaOpt = None,
    atol: AtolOpt = None,
    by: Annotated[By, typer.Option("--by", help="Rows of the table (and of CSV).")] = By.module,
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
    """Update sparsity: the fraction of weights a fine-tune left unchanged, per tensor, module type, layer
    and in total.

    RL fine-tunes (GRPO, DAPO, ...) stored in bf16 typically leave most weights bitwise unchanged; SFT
    changes nearly all of them. Tensors are paired by name; tensors on one side only or with another
    shape are skipped (a summary on stderr, the list in JSON/CSV and with --verbose). Non-finite
    entries (NaN/inf on either side) are counted separately.

    Examples:

    `ckptprobe sparsity base.safetensors ft.safetensors`

    `ckptprobe sparsity ./base ./ft --by layer -o sparsity.json`

    `ckptprobe sparsity org/base org/ft@v2 --include '*.layers.13.*'`
    """
    from ckptprobe.cli._common import (check_output, configure_threads, emit, open_sources, report_skipped,
                                       require_some, tolerances)

    configure_threads(threads, workers)  # before the analysis imports numpy: its BLAS then starts no thread
    from ckptprobe.analysis.sparsity import sparsity as run
    from ckptprobe.report.output import progress_bar, table

    eta, atol = tolerances(mode, eta, atol)
    out = check_output(fmt, output, verbose)
    a, b = open_sources([base, finetuned], revision, token, download, strip_prefix, add_prefix)
    b_keys = set(b.keys())
    names_bytes = sum(a.info(n).nbytes + b.info(n).nbytes for n in a.keys() if n in b_keys)
    with progress_bar("comparing", names_bytes) as advance:
        result = run(a, b, mode, eta, atol, include or (), exclude or (),
                     progress=advance, workers=workers)
    require_some(result.tensors, result.skipped, verbose, "tensor")
    report_skipped(result.skipped, verbose)
    data = result.to_dict()
    rows = result.rows(by.value)
    total = result.total
    mode_text = result.mode if result.mode != "auto" else "auto: " + ", ".join(sorted({t.mode for t in result.tensors}))
    cols = ["name", "shape", "dtype", "numel", "changed", "nonfinite", "sparsity"] if by == By.tensor else \
        [by.value, "numel", "changed", "nonfinite", "sparsity"]
    caption = (f"total: {total.changed:,} of {total.numel:,} entries changed; sparsity {total.sparsity:.4f} "
               f"({100 * total.sparsity:.1f}% unchanged), mode {mode_text}" if total.sparsity is not None else None)
    if caption and any(t.dtype.startswith("F8_") for t in result.tensors):
        caption += "; FP8 weights compared on their stored bits (block scales are not weights)"
    emit(out, data, rows, [table(f"Update sparsity of {result.finetuned} vs {result.base}, by {by.value}", rows,
                                 cols, caption)])
