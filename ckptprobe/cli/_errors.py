"""Errors in plain words: a click usage error or a library error -> (one-line message, hint).

The library names Python parameters (`UsageError(..., param="k")`, message `k=64 ...`); the user
typed flags, so messages are shown with the flag (`-k 64 ...`).
"""

from __future__ import annotations

import re

import typer

ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

# Python parameter name -> the flag that sets it, where the two differ in more than _ vs -.
FLAGS = {"k": "-k", "rank": "-k", "runs": "--from", "fmt": "--format"}


def flag(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def describe(e: BaseException) -> tuple[str, str | None]:
    """A library error (CkptprobeError or OSError) as one line and a hint."""
    if isinstance(e, OSError) and not hasattr(e, "hint"):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}".replace("\n", " "), None
    message = " ".join(str(e).split())
    param = getattr(e, "param", None)
    if param:
        prefix = f"{param}="
        message = (flag(param) + " " + message[len(prefix):] if message.startswith(prefix)
                   else f"{flag(param)}: {message}")
    return message, getattr(e, "hint", None)


def usage_error(e) -> tuple[str, str | None]:
    """A click usage error as one line in plain words, and a hint naming the help to read."""
    ctx = getattr(e, "ctx", None)
    hint = f"see `{ctx.command_path} --help`" if ctx is not None else "see `ckptprobe --help`"
    kind = type(e).__name__
    param = getattr(e, "param", None)
    name = _param_name(param) if param is not None else getattr(e, "param_hint", None)
    if kind == "MissingParameter":
        what = "argument" if getattr(param, "param_type_name", "") == "argument" else "option"
        return f"missing {what} {name}", hint
    if kind == "NoSuchOption":
        close = getattr(e, "possibilities", None)
        return (f"no option {e.option_name}" + (f"; did you mean {sorted(close)[0]}?" if close else "")), hint
    if kind == "BadParameter" or param is not None:
        return f"{name}: {_reason(e)}", hint
    text = " ".join(e.format_message().split()).rstrip(".")
    return text[:1].lower() + text[1:], hint


def _param_name(param) -> str:
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")] or list(getattr(param, "opts", []))
    if getattr(param, "param_type_name", "") == "argument" or not opts:
        return (param.metavar or str(param.name).upper()).rstrip(".")
    return opts[0]


def _reason(e) -> str:
    """Why click refused a value, in the words the rest of the project uses ("must be >= 1, got 0")."""
    message = " ".join(e.message.split()).rstrip(".")
    kind = getattr(getattr(e, "param", None), "type", None)
    refused = re.match(r"(.+?) is not (in the range|a valid (integer|float))", message)
    if refused is None:
        return message
    got = refused[1]
    if refused[3]:
        return f"must be {'a whole number' if refused[3] == 'integer' else 'a number'}, got {got}"
    bounds = [f"{'>' if kind.min_open else '>='} {kind.min:g}" if kind.min is not None else "",
              f"{'<' if kind.max_open else '<='} {kind.max:g}" if kind.max is not None else ""]
    return f"must be {' and '.join(b for b in bounds if b)}, got {got}"
