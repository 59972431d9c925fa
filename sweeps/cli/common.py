"""What every ``cxr-sweep`` command shares: the consoles, one way to fail on bad input, progress
bars and how values are shown.

Bad input is a :class:`trainer.errors.UserError` (every library error about a file, field, row
or name is one), or an error type a command adds for its group: inside :func:`user_errors` it
becomes one red line on stderr and exit code :data:`EXIT_USER_ERROR`, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from trainer.errors import UserError

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USER_ERROR",
    "TableColumn",
    "console",
    "err_console",
    "fail",
    "param_lines",
    "plain_help_types",
    "print_table",
    "progress",
    "quiet_libraries",
    "short",
    "user_errors",
]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(msg: str) -> typer.Exit:
    """Print ``msg`` as one error line; the caller raises the returned exit (code 2). ``msg`` is
    plain text: a run name's ``[trial id]`` is printed as it is, never read as Rich markup."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", msg), highlight=False, soft_wrap=True)
    return typer.Exit(code=EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn a :class:`UserError` (or one of ``extra``) raised inside into :func:`fail`."""
    try:
        yield
    except (UserError, *extra) as e:
        raise fail(str(e)) from None


def quiet_libraries(verbose: bool) -> None:
    """Library chatter off unless ``verbose``: MLflow's INFO logs (its database setup, model
    registration), Ray's config box, warnings and trial tracebacks, Optuna's study line, the ONNX
    exporter's steps. Set before the libraries load (commands import them lazily)."""
    os.environ["CXR_VERBOSE"] = "1" if verbose else "0"
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow loads
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case it has loaded already


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


def param_lines(params: Mapping[str, Any]) -> str:
    """Searched values as ``name=value``, one a line (a table cell wraps between values, never
    inside one), in the order given."""
    return "\n".join(f"{k.split('.')[-1]}={short(v)}" for k, v in params.items())


class TableColumn(NamedTuple):
    """A table column. ``drop`` 0 is always shown; on a terminal too narrow for every column, those
    with the highest ``drop`` go first (the caption names them)."""

    name: str
    justify: str = "left"
    drop: int = 0


def print_table(
    title: str, columns: Sequence[TableColumn], rows: Sequence[Sequence[str]], caption: str | None = None
) -> None:
    """``columns`` and ``rows`` of cells (a cell may hold several lines, e.g. one searched value a
    line): a rich table on a terminal, piped (a file, CI, another program) plain aligned text with
    one row a line and nothing cut.

    On a terminal no value is folded: the table keeps the columns that fit whole, dropping the
    least useful first, and says which it left out."""
    if not console.is_terminal:
        typer.echo(_plain_table(title, columns, rows, caption))
        return
    keep = list(range(len(columns)))
    hidden: list[str] = []
    while _table_width([columns[i] for i in keep], [[r[i] for i in keep] for r in rows]) > console.width:
        droppable = [i for i in keep if columns[i].drop > 0]
        if not droppable:
            break
        worst = max(droppable, key=lambda i: (columns[i].drop, i))
        keep.remove(worst)
        hidden.insert(0, columns[worst].name)
    if hidden:
        note = f"not shown at {console.width} columns: {', '.join(hidden)} (a wider terminal, or pipe it)"
        caption = f"{caption}\n{note}" if caption else note
    table = Table(title=title, caption=caption)
    for i in keep:
        col = columns[i]
        width = _cell_width(col.name, [r[i] for r in rows])
        table.add_column(col.name, justify=col.justify, overflow="fold", min_width=width)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*(Text(row[i]) for i in keep))  # cells are data: `[a29f8177]` is no markup tag
    console.print(table)


def _table_width(columns: Sequence[TableColumn], rows: Sequence[Sequence[str]]) -> int:
    """Characters a rich table needs to show every header and cell line whole (padding both sides
    of a cell, a border between and around the columns)."""
    return 1 + sum(_cell_width(name, [r[i] for r in rows]) + 3 for i, (name, *_) in enumerate(columns))


def _cell_width(name: str, cells: Sequence[str]) -> int:
    """A column's width with its header and every cell line whole."""
    return max([len(name), *(len(line) for c in cells for line in c.splitlines())])


def _plain_table(
    title: str, columns: Sequence[TableColumn], rows: Sequence[Sequence[str]], caption: str | None
) -> str:
    cells = [[col.name for col in columns]] + [[c.replace("\n", " ") for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if justify == "right" else c.ljust(w)
            for c, w, (_, justify, _) in zip(r, widths, columns, strict=True)
        ).rstrip()

    return "\n".join([title, *(line(r) for r in cells)] + ([caption] if caption else []))


_PLAIN_TYPES = False  # Typer's help patched (once per process)
_HELP_TYPES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN"}


def plain_help_types() -> None:
    """Help in click's words: a flag shows no ``<bool>``, a value its type as ``TEXT``/``PATH``/
    ``INTEGER``, an argument its name as ``SPACE`` (Typer 0.29 prints ``<str>`` and ``{space}``).
    Typer offers no setting for it: its two display methods are replaced, once, here."""
    global _PLAIN_TYPES
    from typer import core

    if _PLAIN_TYPES:
        return
    option_type = core.TyperOption.display_type_rich

    def plain(label: str | None) -> str | None:
        if not label or not label.startswith("<"):
            return label
        inner = label[1:].split(">", 1)[0]
        rest = label.split(">", 1)[1]
        inner = inner.removeprefix("list[").removesuffix("]")
        return (_HELP_TYPES.get(inner) or inner.upper()) + rest

    def option(self, ctx):
        if self.is_flag or self.is_bool_flag:
            return None
        return plain(option_type(self, ctx))

    def argument_usage(self) -> str:
        name = (self.metavar or self.name or "").upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    core.TyperOption.display_type_rich = option
    core.TyperArgument.display_type_rich = lambda self, ctx: plain(core.TyperArgument.display_type(self, ctx))
    core.TyperArgument._usage_display_name = argument_usage
    _PLAIN_TYPES = True
