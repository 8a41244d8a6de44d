"""The `ckptprobe` Typer application: one module per command, registered here."""

from __future__ import annotations

import typer

from ckptprobe.cli.drift import drift
from ckptprobe.cli.sparsity import sparsity

app = typer.Typer(
    name="ckptprobe",
    help="Weight-space diagnostics for LLM post-training checkpoints: how sparse, where, and how "
         "principal-aligned a fine-tune's updates are (RL vs SFT), read tensor by tensor from safetensors "
         "files, folders or Hub repos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
)


@app.callback()
def _root() -> None:
    # A callback keeps `ckptprobe COMMAND` a group even while it has a single command.
    pass


app.command(no_args_is_help=True)(sparsity)
app.command(no_args_is_help=True)(drift)
