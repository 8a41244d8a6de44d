"""The `ckptprobe` Typer application: one module per command, registered here.

Commands are imported lazily: `ckptprobe sparsity ...` builds an app holding the sparsity command
alone, so a command pays start-up for itself only. `ckptprobe --help` and `--version` never build
the app at all (`ckptprobe.cli.main` answers them from `COMMANDS`): Typer's help renderer and the
command modules' imports cost several times the 0.3 s that a help screen may take.
"""

from __future__ import annotations

import importlib

DESCRIPTION = ("Weight-space diagnostics for LLM post-training checkpoints: how sparse, where, and how "
               "principal-aligned a fine-tune's updates are (RL vs SFT), read tensor by tensor from safetensors "
               "files, folders or Hub repos. Start with `ckptprobe demo`.")

# name -> ("module:attribute", summary). An attribute that is a Typer app becomes a command group. Each
# summary is the start of the command's own help (a test checks that they agree).
COMMANDS = {
    "sparsity": ("ckptprobe.cli.sparsity:sparsity",
                 "Update sparsity: the fraction of weights a fine-tune left unchanged"),
    "spectrum": ("ckptprobe.cli.spectrum:spectrum",
                 "Spectrum drift: how much each fine-tune moved every weight matrix's singular values and "
                 "top-k singular subspaces"),
    "principal": ("ckptprobe.cli.principal:principal",
                  "Where a fine-tune's updates land: overlap of its update mask M with the base's principal mask"),
    "consensus": ("ckptprobe.cli.consensus:consensus",
                  "Cross-run consensus: do independent runs from one base change the same weights?"),
    "profile": ("ckptprobe.cli.profile:profile",
                "One run over time: does the pattern of updated rows and columns persist while the density grows?"),
    "drift": ("ckptprobe.cli.drift:drift",
              "Drift over a checkpoint series: how far each module group moved from the base, step by step"),
    "masks": ("ckptprobe.cli.masks:masks_app",
              "Training masks from a base model: build one"),
    "scramble": ("ckptprobe.cli.scramble:scramble",
                 "Write a checkpoint that computes the same function as BASE with its weights in other coordinates."),
    "demo": ("ckptprobe.cli.demo:demo",
             "Run every analysis on the built-in example family and say what each finding means."),
}
# group -> {subcommand: "module:attribute"}: subcommands kept in their own modules.
SUBCOMMANDS = {"masks": {"export": "ckptprobe.cli.masks_export:export"}}


def command_object(name: str):
    """The function (or Typer app, for a group) that implements command `name`."""
    module, attr = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), attr)


def build_app(command: str | None = None):
    """The Typer app with `command` registered (every command when `command` is None)."""
    import typer

    from ckptprobe.cli._options import version_option

    app = typer.Typer(
        name="ckptprobe", help=DESCRIPTION, no_args_is_help=True, add_completion=False,
        pretty_exceptions_enable=False, rich_markup_mode="markdown",
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(version: bool = version_option()) -> None:
        # A callback keeps `ckptprobe COMMAND` a group even when one command is registered.
        pass

    for name in COMMANDS:
        if command is not None and name != command:
            continue
        obj = command_object(name)
        if isinstance(obj, typer.Typer):
            for sub, sub_target in SUBCOMMANDS.get(name, {}).items():
                sub_module, sub_attr = sub_target.split(":")
                obj.command(sub, no_args_is_help=True)(getattr(importlib.import_module(sub_module), sub_attr))
            app.add_typer(obj, name=name)
        else:
            app.command(name, no_args_is_help=name != "demo")(obj)
    return app


def build_command(command: str | None = None):
    """The click command that `ckptprobe.cli.main` runs: `build_app(command)` with tidy help."""
    import typer

    from ckptprobe.cli._options import tidy_help

    return tidy_help(typer.main.get_command(build_app(command)))


def __getattr__(name: str):
    if name == "app":  # the full app, for tests and documentation tools
        return build_app()
    raise AttributeError(name)
