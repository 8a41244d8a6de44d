"""The `ckptprobe` Typer application: one module per command, registered here.

Commands are imported lazily: `ckptprobe sparsity ...` imports only the sparsity
module, so a command pays start-up for itself alone (a full import of every command
costs ~0.3 s, as much as comparing a 1.5 GB bf16 pair). `--help` and unknown commands
load them all.
"""

from __future__ import annotations

import importlib

import typer

# name -> "module:attribute"; an attribute that is a Typer app becomes a command group.
COMMANDS = {
    "sparsity": "ckptprobe.cli.sparsity:sparsity",
    "spectrum": "ckptprobe.cli.spectrum:spectrum",
    "principal": "ckptprobe.cli.principal:principal",
    "consensus": "ckptprobe.cli.consensus:consensus",
    "profile": "ckptprobe.cli.consensus:profile",
    "drift": "ckptprobe.cli.drift:drift",
    "masks": "ckptprobe.cli.masks:masks_app",
    "scramble": "ckptprobe.cli.scramble:scramble",
    "demo": "ckptprobe.cli.demo:demo",
}


def build_app(command: str | None = None) -> typer.Typer:
    """The app with `command` registered, or every command when `command` is None or unknown."""
    app = typer.Typer(
        name="ckptprobe",
        help="Weight-space diagnostics for LLM post-training checkpoints: how sparse, where, and how "
             "principal-aligned a fine-tune's updates are (RL vs SFT), read tensor by tensor from safetensors "
             "files, folders or Hub repos. Start with `ckptprobe demo`.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        rich_markup_mode="markdown",
    )

    @app.callback()
    def _root() -> None:
        # A callback keeps `ckptprobe COMMAND` a group even when one command is registered.
        pass

    for name, target in COMMANDS.items():
        if command in COMMANDS and name != command:
            continue
        module, attr = target.split(":")
        obj = getattr(importlib.import_module(module), attr)
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name, no_args_is_help=name != "demo")(obj)
    return app


def __getattr__(name: str):
    if name == "app":  # the full app, for tests and documentation tools
        return build_app()
    raise AttributeError(name)
