"""`ckptprobe sparsity BASE FT`: the fraction of weights a fine-tune left unchanged."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA, CompareMode
from ckptprobe.cli._options import (BaseArg, DownloadOpt, ExcludeOpt, FormatOpt, IncludeOpt, OutputOpt,
                                    RevisionOpt, TokenOpt)
from ckptprobe.report.output import Format


class By(str, Enum):
    tensor = "tensor"
    module = "module"
    layer = "layer"
    group = "group"


ModeOpt = Annotated[Optional[CompareMode], typer.Option(
    "--mode", "-m", show_default="bitwise if dtypes match, else bf16",
    help="How 'unchanged' is decided. bitwise: stored bits equal (+0 == -0); for bf16 this is exactly the "
         "paper's rule |w'-w| <= eta*max(|w|,|w'|), eta=1e-3. bf16: round both sides to bf16, then bitwise "
         "(would the change survive bf16 storage?). eta: the relative rule with --eta. atol: |w'-w| <= --atol, "
         "the rule of earlier work; it over-reports changes of large weights (1024.001 vs 1024.002 in fp32: "
         "same bf16 value, difference 1e-3 > atol) and misses changes of small ones (1e-6 -> 2e-6 doubles "
         "the weight, difference 1e-6 < atol).")]


def sparsity(
    base: BaseArg,
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (same kinds of reference as BASE).",
                                             show_default=False, metavar="FT")],
    mode: ModeOpt = None,
    eta: Annotated[float, typer.Option(help="Relative tolerance for --mode eta.", min=0)] = DEFAULT_ETA,
    atol: Annotated[float, typer.Option(help="Absolute tolerance for --mode atol.", min=0)] = DEFAULT_ATOL,
    by: Annotated[By, typer.Option("--by", help="Rows of the table (and of CSV).")] = By.module,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Update sparsity: the fraction of weights a fine-tune left unchanged, per tensor, module type, layer
    and in total.

    RL fine-tunes (GRPO, DAPO, ...) stored in bf16 typically leave most weights bitwise unchanged; SFT
    changes nearly all of them. Tensors are paired by name; tensors on one side only or with another
    shape are listed as skipped. Non-finite entries (NaN/inf on either side) are counted separately.

    Examples:

    `ckptprobe sparsity base.safetensors ft.safetensors`

    `ckptprobe sparsity ./base ./ft --by layer --format json -o sparsity.json`

    `ckptprobe sparsity org/base org/ft@v2 --include '*.layers.13.*'`
    """
    from ckptprobe.analysis.sparsity import sparsity as run
    from ckptprobe.io.sources import open_source
    from ckptprobe.report.output import emit, progress_bar, table, warn

    a = open_source(base, revision, token, download)
    b = open_source(finetuned, revision, token, download)
    b_keys = set(b.keys())
    names_bytes = sum(a.info(n).nbytes + b.info(n).nbytes for n in a.keys() if n in b_keys)
    with progress_bar("comparing", names_bytes) as advance:
        result = run(a, b, mode, eta, atol, include or (), exclude or (), progress=advance)
    for s in result.skipped:
        warn(f"skipped {s.name}: {s.reason}")
    if not result.tensors:
        warn("no tensor was compared (check --include/--exclude and the two checkpoints' names)")
    data = result.to_dict()
    rows = data["tensors"] if by == By.tensor else data["groups"][by.value]
    total = result.total
    mode_text = result.mode if result.mode != "auto" else "auto: " + ", ".join(sorted({t.mode for t in result.tensors}))
    cols = ["name", "shape", "dtype", "numel", "changed", "nonfinite", "sparsity"] if by == By.tensor else \
        [by.value, "numel", "changed", "nonfinite", "sparsity"]
    caption = (f"total: {total.changed:,} of {total.numel:,} entries changed; sparsity {total.sparsity:.4f} "
               f"({100 * total.sparsity:.1f}% unchanged), mode {mode_text}" if total.sparsity is not None else None)
    if caption and any(t.dtype.startswith("F8_") for t in result.tensors):
        caption += "; FP8 weights compared on their stored bits (block scales are not weights)"
    tables = [table(f"Update sparsity of {result.finetuned} vs {result.base}, by {by.value}", rows, cols, caption)]
    if result.skipped:
        tables.append(table("Skipped", [s.to_dict() for s in result.skipped]))
    emit(fmt, data, rows, tables, output)
