"""How a sweep ends when it does not finish: a late failure or an interruption.

A sweep that fails after its checks passed (an error in the driver, every trial failed) raises
:class:`SweepFailed`: one line that names the cause, with the whole traceback written to a log
file beside the sweep (:func:`write_traceback`). A sweep stopped by Ctrl-C (SIGINT) raises
:class:`SweepInterrupted`, which carries the exact command that continues it. Both leave no
MLflow run RUNNING (:mod:`sweeps.tracking.parent`).
"""

from __future__ import annotations

import errno
import tempfile
import traceback
from pathlib import Path
from typing import Any

from trainer.errors import UserError

from ..space import SweepSpec

__all__ = ["SweepFailed", "SweepInterrupted", "is_storage_full", "one_line", "root_cause", "write_traceback"]

_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded")


class SweepFailed(UserError):
    """The sweep failed after its checks: the message is one line; ``rows`` the trials so far."""

    def __init__(
        self, spec: SweepSpec, message: str, rows: list[dict[str, Any]] | None = None, log: str | None = None
    ):
        super().__init__(message)
        self.name, self.mode = spec.name, spec.mode
        self.rows = rows or []
        self.log = log  # the traceback's file: a failure in the driver (None: every trial failed)


class SweepInterrupted(Exception):
    """The sweep was interrupted (Ctrl-C): its state is saved; ``resume`` is the command that continues it."""

    def __init__(self, spec: SweepSpec, rows: list[dict[str, Any]]):
        self.name = spec.name
        self.rows = rows
        self.mode = spec.mode
        self.resume = f"cxr-sweep sweep resume {spec.name} --storage {spec.storage_path}"
        super().__init__(f"sweep {spec.name!r} interrupted; continue it with `{self.resume}`")


def is_storage_full(error: BaseException | None) -> bool:
    """Whether ``error`` or anything in its chain of causes is a full filesystem."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return False


def root_cause(error: BaseException) -> BaseException:
    """The error that explains ``error``: the first bad input (:class:`UserError`) in its chain of
    causes, Ray's wrappers included (``RayTaskError.cause``), else the innermost error."""
    chain, seen, todo = [], set(), [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        for nxt in (getattr(e, "cause", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    for e in chain:
        if isinstance(e, UserError):
            return e
    return chain[-1]


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (a UserError: just its message)."""
    text = str(error).strip().splitlines()
    head = text[0] if text else ""
    return head if isinstance(error, UserError) else f"{type(error).__name__}: {head}".rstrip(": ")


def write_traceback(spec: SweepSpec, error: BaseException) -> str:
    """The full traceback of ``error`` in ``<storage_path>/<name>.error.log`` (local storage), else a
    temporary file; returns its path."""
    text = "".join(traceback.format_exception(error))
    if not spec.remote_storage:
        try:
            path = Path(spec.storage_path) / f"{spec.name}.error.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return str(path)
        except OSError:
            pass
    with tempfile.NamedTemporaryFile("w", prefix=f"cxr-sweep-{spec.name}-", suffix=".log", delete=False) as f:
        f.write(text)
    return f.name
