"""Command-line entry point: `main()` runs the app and turns every known error into one line.

Usage errors (a bad option, a missing argument, a conflict between options) print one line
`Error: ...` and a `Hint:` naming the help to read, on stderr, exit 2. Known runtime errors
(`CkptprobeError`, `OSError`: a missing file, a malformed checkpoint, an unreachable Hub) print
`Error: ...` (and a hint when there is one), exit 1. Set CKPTPROBE_DEBUG=1 to see the traceback.
`ckptprobe`, `ckptprobe --help` and `ckptprobe --version` are answered without importing Typer.
"""

from __future__ import annotations

import os
import sys

HELP = ("-h", "--help")
VERSION = ("-V", "--version")


def main(argv: list[str] | None = None) -> int:
    """Run ckptprobe with `argv` (default: sys.argv[1:]); returns the exit code."""
    from ckptprobe.cli._app import COMMANDS

    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), None)
    if command is None or command not in COMMANDS:
        early = _answer_early(args, command)
        if early is not None:
            return early
    debug = os.environ.get("CKPTPROBE_DEBUG", "") not in ("", "0")
    from ckptprobe.errors import CkptprobeError, UsageError
    from ckptprobe.io._inputs import guarding_inputs

    try:
        from ckptprobe.cli._app import build_command
        from ckptprobe.cli._errors import ClickException, usage_error

        try:
            with guarding_inputs():  # no output of the command replaces a file it reads
                code = build_command(command).main(args=args, prog_name="ckptprobe", standalone_mode=False)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `ckptprobe sparsity` alone: its help was shown
                return 0
            if debug:
                raise
            message, hint = usage_error(e)
            return _fail(message, hint, e.exit_code)
        if code == 130:  # Typer returns Ctrl-C as its exit status, 130
            print("Interrupted", file=sys.stderr)
        return code if isinstance(code, int) else 0
    except (CkptprobeError, OSError) as e:
        if debug:
            raise
        from ckptprobe.cli._errors import describe

        message, hint = describe(e)
        return _fail(message, hint, 2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130


def _fail(message: str, hint: str | None, code: int) -> int:
    print(f"Error: {message}", file=sys.stderr)
    if hint:
        print(f"Hint: {hint}", file=sys.stderr)
    return code


def _answer_early(args: list[str], command: str | None) -> int | None:
    """Answer `ckptprobe`, `--help`, `--version` and an unknown command without building the app;
    None when the app must run (a bad root option, say)."""
    from ckptprobe.cli._app import COMMANDS, DESCRIPTION

    if command is not None:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        return _fail(f"no command {command!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                     "the commands are " + ", ".join(COMMANDS) + "; see `ckptprobe --help`", 2)
    if any(a in VERSION for a in args):
        from ckptprobe import __version__

        print(f"ckptprobe {__version__}")
        return 0
    if args and not any(a in HELP for a in args):
        return None
    import shutil
    import textwrap

    width = max(40, min(100, shutil.get_terminal_size().columns) - 2)  # COLUMNS=1 would leave no room
    name_width = max(map(len, COMMANDS)) + 2
    lines = ["Usage: ckptprobe [OPTIONS] COMMAND [ARGS]...", "",
             textwrap.fill(DESCRIPTION, width, initial_indent="  ", subsequent_indent="  "), "", "Commands:"]
    for name, (_, summary) in COMMANDS.items():
        lines.append(textwrap.fill(summary, width, initial_indent=f"  {name:<{name_width}}",
                                   subsequent_indent=" " * (2 + name_width)))
    lines += ["", "Options:",
              f"  {'-V, --version':<{name_width + 4}}Print the version and exit.",
              f"  {'-h, --help':<{name_width + 4}}Show this message and exit.",
              "", "Run `ckptprobe COMMAND --help` for a command's options and examples."]
    print("\n".join(lines))
    return 0


def run() -> None:
    """The console script: `main()`, then out at once. By then every output is written and
    closed, and the interpreter's teardown (freeing every module, numpy's included) would
    only add ~0.1 s, so the streams are flushed and the process ends with `os._exit`."""
    for name in ("stdout", "stderr"):  # started with the stream closed (`>&-`): its output goes nowhere
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): it had what it wanted
        pass
    os._exit(code)
