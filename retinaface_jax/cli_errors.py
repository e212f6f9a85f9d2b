"""How every command-line entry point reports errors: one line on stderr, no traceback.

A user error (a missing or malformed file, a bad option, no network for a download) is printed
as ``PROG: error: MESSAGE`` and the command exits with a non-zero status. The traceback is shown
only when asked for, with ``--debug`` or ``RETINAFACE_DEBUG=1``, so that bug reports can carry
it. Unexpected exceptions are reported the same way, with a hint how to get the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "RETINAFACE_DEBUG"
EXIT_ERROR = 2


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show tracebacks instead of one-line errors."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)",
    )


def debug_requested(argv: Sequence[str] | None) -> bool:
    """Whether ``--debug`` is among ``argv`` (default ``sys.argv[1:]``) or the env var is set."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(error: BaseException) -> str:
    """The message of ``error`` as one line, the exception type only where it says something."""
    message = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError) and error.args:
        message = str(error.args[0])
    expected = (ValueError, OSError, RuntimeError, KeyError, LookupError)
    if not isinstance(error, expected):
        message = f"{type(error).__name__}: {message}"
    return message


def run_cli(
    prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None
) -> int:
    """``main(argv)`` with user-facing error reporting; returns the exit status."""
    if debug_requested(argv):
        return main(argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prog}: error: out of memory", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError, RuntimeError, KeyError, LookupError) as e:
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line, with how to see where it happened
        print(
            f"{prog}: error: {describe(e)} (unexpected; rerun with --debug or {DEBUG_ENV}=1 "
            "for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR
