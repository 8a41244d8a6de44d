"""Every option, argument and choice of the command line, defined once.

An option with one meaning has one name, short flag, default and help in every command. Commands
import their options from here and from nowhere else.
"""

from __future__ import annotations

import copy
import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ckptprobe.analysis.choices import (DEFAULT_ALPHA, DEFAULT_ATOL, DEFAULT_ETA, CompareMode, Kind, LowThreshold,
                                        TopkMethod, Vectors)
from ckptprobe.report.output import Format

__all__ = ["DEFAULT_ALPHA", "DEFAULT_ATOL", "DEFAULT_ETA", "By", "CompareMode", "Format", "Kind", "LowThreshold",
           "TopkMethod", "Vectors"]


class By(str, Enum):
    """Rows of a result table (and of CSV): one per tensor, or pooled per module type, layer or group."""

    tensor = "tensor"
    module = "module"
    layer = "layer"
    group = "group"


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not auto, cpu, cuda or cuda:N")
    return value


def _tolerance(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):  # NaN passes a plain `min=0`
        raise typer.BadParameter(f"must be a finite number >= 0, got {value:g}")
    return value


def _fraction(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"must be a fraction in (0, 1], got {value:.15g}")  # :g would show 1.0000001 as 1
    return value


def _version(value: bool) -> None:
    if value:
        from ckptprobe import __version__

        print(f"ckptprobe {__version__}")
        raise typer.Exit()


def version_option():
    """`--version` of the root command (a default value: the root callback is defined where this module's
    names are not in scope)."""
    return typer.Option(False, "--version", "-V", is_eager=True, callback=_version, help="Print the version and exit.")

# checkpoints
BaseArg = Annotated[str, typer.Argument(
    help="Base checkpoint: a .safetensors file, a folder (sharded with an index, or model.safetensors), "
         "or a Hub repo org/name[@revision].", show_default=False, metavar="BASE")]
FinetunedArg = Annotated[List[str], typer.Argument(
    help="Fine-tuned checkpoints of BASE (same kinds of reference), each compared with BASE.",
    show_default=False, metavar="FT...")]
RunsArg = Annotated[List[str], typer.Argument(
    help="Two or more fine-tunes of BASE (independent runs), same kinds of reference as BASE.",
    show_default=False, metavar="RUN...")]
SeriesArg = Annotated[List[str], typer.Argument(
    help="Checkpoints of one run, in training order (e.g. step-100 step-200 ...).", show_default=False,
    metavar="CKPT...")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", metavar="REV",
    help="Hub revision (branch, tag or commit) for Hub references that do not give one with @.")]
TokenOpt = Annotated[Optional[str], typer.Option(
    "--token", envvar="HF_TOKEN", show_envvar=True, metavar="TOKEN",
    help="Hub token for gated or private repos; default: HF_TOKEN, then the token saved by `hf auth login`.")]
DownloadOpt = Annotated[bool, typer.Option(
    "--download", help="Hub: download whole shards (those the run reads) into the Hub cache, one at a time, "
                       "instead of reading only the needed byte ranges; faster for repeated runs, and what a later "
                       "HF_HUB_OFFLINE=1 run reads.")]
StripPrefixOpt = Annotated[Optional[str], typer.Option(
    "--strip-prefix", metavar="PREFIX",
    help="Remove PREFIX from the tensor names of every checkpoint after BASE, e.g. `model.` to compare a "
         "bare model with its ...ForCausalLM checkpoint.")]
AddPrefixOpt = Annotated[Optional[str], typer.Option(
    "--add-prefix", metavar="PREFIX",
    help="Put PREFIX before the tensor names of every checkpoint after BASE (after --strip-prefix).")]
IncludeOpt = Annotated[Optional[List[str]], typer.Option(
    "--include", "-i", metavar="GLOB",
    help="Only tensors whose name matches this glob (repeatable; braces as in bash), e.g. `*.layers.13.*` or "
         "`*.layers.{0,13}.*`.")]
ExcludeOpt = Annotated[Optional[List[str]], typer.Option(
    "--exclude", "-x", metavar="GLOB",
    help="Leave out tensors whose name matches this glob (repeatable; braces as in bash), e.g. `*norm*` or "
         "`*.{q,k}_proj.*`.")]

# output
def file_name(text: str) -> Path:
    """The value of an option naming a file to write: a name that ends in a separator names a folder
    (`-o results/`), which Path would silently turn into a file `results`."""
    if text.endswith(("/", "\\")):
        raise typer.BadParameter(f"{text} ends in {text[-1]}, so it names a folder; give a file name")
    return Path(text)


FormatOpt = Annotated[Optional[Format], typer.Option(
    "--format", "-f", show_default="from the -o extension (.json, .csv), else table",
    help="table (for reading), json or csv (for machines).")]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="FILE", parser=file_name,
    help="Write the result to this file instead of stdout (a regular file is replaced atomically; a "
         "device or pipe is written in place). Its extension .json or .csv sets the format.")]
ExportOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="FILE", parser=file_name,
    help="Write the export to this file instead of stdout (a regular file is replaced atomically; a device "
         "or pipe is written in place).")]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", metavar="FILE", show_default=False, parser=file_name,
    help="Draw the figures into FILE, whose extension (.png, .pdf or .svg) gives the format. A command "
         "with several figures adds each one's name to the file name: --plot figs/run.png writes "
         "figs/run-jaccard.png, ...")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="List every skipped tensor with its reason on stderr (not only the summary).")]

# resources
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", min=1, metavar="N", show_default="the CPUs not busy now (OMP_NUM_THREADS when set), at most 16",
    help="Threads for torch and BLAS (SVDs, matrix products).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=1, metavar="N", show_default="the CPUs this process may use",
    help="Worker processes (threads for Hub sources) that read and compare windows of tensors in parallel.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=_device, metavar="auto|cpu|cuda[:N]",
    help="Where SVDs run: auto picks CUDA when torch sees a GPU.")]

# what is compared
ModeOpt = Annotated[Optional[CompareMode], typer.Option(
    "--mode", "-m", show_default="bitwise if dtypes match, else bf16",
    help="How 'unchanged' is decided. bitwise: stored bits equal (+0 == -0); for bf16 this is exactly the "
         "paper's rule |w'-w| <= eta*max(|w|,|w'|), eta=1e-3. bf16: round both sides to bf16, then bitwise "
         "(would the change survive bf16 storage?). eta: the relative rule with --eta. atol: |w'-w| <= --atol, "
         "the rule of earlier work; it over-reports changes of large weights (1024.001 vs 1024.002 in fp32: "
         "same bf16 value, difference 1e-3 > atol) and misses changes of small ones (1e-6 -> 2e-6 doubles "
         "the weight, difference 1e-6 < atol).")]
EtaOpt = Annotated[Optional[float], typer.Option(
    "--eta", callback=_tolerance, metavar="X", show_default=str(DEFAULT_ETA),
    help="Relative tolerance of --mode eta.")]
AtolOpt = Annotated[Optional[float], typer.Option(
    "--atol", callback=_tolerance, metavar="X", show_default=str(DEFAULT_ATOL),
    help="Absolute tolerance of --mode atol.")]
ZOpt = Annotated[float, typer.Option(
    "--z", callback=_tolerance, metavar="X", help="z-score above which an lm_head step counts as a surge.")]
LayerOpt = Annotated[Optional[int], typer.Option(
    "--layer", "-l", min=0, metavar="N", show_default="the middle layer",
    help="The layer whose matrices are drawn by --plot (consensus and profile: also profiled in JSON).")]
HeadDimOpt = Annotated[Optional[int], typer.Option(
    "--head-dim", min=1, metavar="N",
    show_default="from config.json beside BASE (head_dim, or hidden_size/num_attention_heads)",
    help="Attention head size, to mark head boundaries in plots.")]

# masks and SVDs
RankOpt = Annotated[Optional[int], typer.Option(
    "--rank", "-k", min=1, metavar="K", show_default="min(64, min(m, n) // 16) per matrix, at least 1",
    help="Rank k of the SVD reconstruction W0^(k) behind the principal mask. A matrix whose smaller side is "
         "below k is skipped (and listed).")]
SubspaceRankOpt = Annotated[Optional[int], typer.Option(  # spectrum: its own default (a quarter, not a 16th)
    "--rank", "-k", min=1, metavar="K", show_default="min(64, min(m, n) // 4) per matrix, at least 1",
    help="Rank k of the top-k singular subspaces compared. A matrix whose smaller side is below k is skipped "
         "(and listed).")]
AlphaOpt = Annotated[float, typer.Option(
    "--alpha", callback=_fraction, metavar="X",
    help="Fraction of each matrix in the principal mask (and in the low mask with --low-threshold "
         "alpha): exactly round(alpha * n) entries, ties to the lowest index.")]
LowOpt = Annotated[LowThreshold, typer.Option(
    "--low-threshold", help="Low-magnitude mask: alpha = the alpha fraction of smallest |W0|; mean = every "
                            "entry below the matrix's mean |W0| (the paper's choice for training masks).")]
TopkMethodOpt = Annotated[TopkMethod, typer.Option(
    "--topk-method", help="How top-k singular vectors are found. auto: exact; randomized (seeded range finder, "
                          "oversampling and power iterations) for matrices with a side >= 8192, except tall ones "
                          "whose full spectrum is computed anyway. Randomized is accurate when the spectrum decays "
                          "past k, as in trained weights, not on a flat one. exact: never randomized.")]


def tidy_help(command):
    """Leave type noise out of `--help`: plain flags show no `<bool>`; other options name their value by
    metavar. `command` is a click command or group; returned for chaining."""
    for param in getattr(command, "params", ()):
        _no_type(param)
    make_help_option = command.get_help_option  # --help is made on demand, outside `params`
    command.get_help_option = lambda ctx: _no_type(make_help_option(ctx))
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)
    return command


def _no_type(param):
    if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""
    if getattr(param, "param_type_name", "") == "argument":  # the metavar (BASE, FT...) says what it is
        param.type = copy.copy(param.type)  # click shares one instance per type between parameters
        param.type.get_metavar = lambda *args, **kwargs: ""
    return param
