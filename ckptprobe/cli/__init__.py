"""Command-line entry point: `main()` runs the app and turns known errors into one line."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Run ckptprobe. Known errors print `Error: ...` (and a hint) on stderr and exit 1; usage errors exit 2.

    Set CKPTPROBE_DEBUG=1 to see the traceback instead.
    """
    from ckptprobe.cli._app import build_app
    from ckptprobe.errors import CkptprobeError, UsageError

    args = sys.argv[1:] if argv is None else argv
    app = build_app(next((a for a in args if not a.startswith("-")), None))
    debug = os.environ.get("CKPTPROBE_DEBUG", "") not in ("", "0")
    try:
        app(args=args, prog_name="ckptprobe")  # Typer itself reports usage errors (exit 2) and exits
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (CkptprobeError, OSError) as e:
        if debug:
            raise
        message = str(e) if isinstance(e, CkptprobeError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        print(f"Error: {message}", file=sys.stderr)
        hint = getattr(e, "hint", None)
        if hint:
            print(f"Hint: {hint}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return 0


def run() -> None:
    sys.exit(main())
