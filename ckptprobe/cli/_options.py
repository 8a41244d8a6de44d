"""Option and argument types shared by every command, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ckptprobe.report.output import Format

BaseArg = Annotated[str, typer.Argument(
    help="Base checkpoint: a .safetensors file, a folder (sharded with an index, or model.safetensors), "
         "or a Hub repo org/name[@revision].", show_default=False, metavar="BASE")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", help="Hub revision (branch, tag or commit) for Hub references that do not give one with @.")]
TokenOpt = Annotated[Optional[str], typer.Option(
    "--token", envvar="HF_TOKEN", show_envvar=True,
    help="Hub token for gated or private repos; default: HF_TOKEN, then the token saved by `hf auth login`.")]
DownloadOpt = Annotated[bool, typer.Option(
    "--download", help="Hub: download whole shards into the Hub cache (one at a time) instead of reading "
                       "only the needed byte ranges; faster for repeated runs.")]
IncludeOpt = Annotated[Optional[List[str]], typer.Option(
    "--include", "-i", help="Only tensors whose name matches this glob (repeatable), e.g. `*.layers.13.*`.")]
ExcludeOpt = Annotated[Optional[List[str]], typer.Option(
    "--exclude", "-x", help="Leave out tensors whose name matches this glob (repeatable), e.g. `*norm*`.")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table (for reading), json or csv (for machines).")]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Write to this file (atomically) instead of stdout.", dir_okay=False)]
