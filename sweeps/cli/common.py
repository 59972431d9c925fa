"""What every ``cxr-sweep`` command shares: the consoles, one way to fail on bad input, progress
bars and how values are shown.

Bad input is a :class:`trainer.errors.UserError` (every library error about a file, field, row
or name is one), or an error type a command adds for its group: inside :func:`user_errors` it
becomes one red line on stderr and exit code :data:`EXIT_USER_ERROR`, never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trainer.errors import UserError

__all__ = ["EXIT_USER_ERROR", "console", "err_console", "fail", "progress", "short", "user_errors"]

EXIT_USER_ERROR = 2
console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(msg: str) -> typer.Exit:
    """Print ``msg`` as one error line; the caller raises the returned exit (code 2)."""
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    return typer.Exit(code=EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn a :class:`UserError` (or one of ``extra``) raised inside into :func:`fail`."""
    try:
        yield
    except (UserError, *extra) as e:
        raise fail(str(e)) from None


def progress(what: str) -> Progress:
    """A bar of ``what`` with done/total counts and the time elapsed."""
    return Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def short(v: Any) -> str:
    """A searched value for a table: numbers (or numeric strings from MLflow) to 3 significant digits."""
    if isinstance(v, bool):
        return str(v)
    try:
        return f"{float(v):.3g}"
    except (TypeError, ValueError):
        return str(v)
