"""Terminal conventions shared by every command: stdout is the product, the rest goes to stderr.

Exit codes: 0 success, 1 user error (one line on stderr), 2 usage error, 130 interrupted.
A closed stdout pipe (``seer generate … | head``) ends quietly with code 0.
"""

import functools
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from .engine.errors import SeerError

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130

stderr = Console(stderr=True, highlight=False)


def write_product(text: str) -> None:
    """Write to stdout at once (streamed tokens, JSON)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def show_python_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: a library's warning (the engine falling
    back to a slower path, say) as one line like ours, not two with a source line."""
    warn(str(message))


def _silence_stdout() -> None:
    """After the reader went away, point stdout at /dev/null so the final flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # not a real file descriptor (e.g. captured by a test runner)


def handle_user_errors(command):
    """Turn SeerError, Ctrl-C and a closed pipe into their exit codes, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SeerError as error:
            stderr.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(0) from None

    return wrapper
