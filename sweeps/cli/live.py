"""The live view of a running sweep (``sweep run`` / ``sweep resume``).

On a terminal: a progress bar of the epochs (done of at most planned: the scheduler may stop trials
sooner), the ETA, the trials by state, and the best value so far with its configuration; a line
above it for each trial that starts, finishes or fails. Not on a terminal (a file, CI): those
lines, plus a status line every ``interval_s`` seconds.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from .common import console, short

if TYPE_CHECKING:
    from ..driver.progress import Snapshot

__all__ = ["LiveSweep", "status_line"]

_ORDER = ("RUNNING", "DONE", "STOPPED", "INTERRUPTED", "ERROR", "PENDING")
_WORDS = {"ERROR": "failed"}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _counts(snap: Snapshot) -> str:
    parts = [f"{snap.counts[s]} {_WORDS.get(s, s.lower())}" for s in _ORDER if snap.counts.get(s)]
    return ", ".join(parts) or "no trials yet"


def _best(snap: Snapshot) -> str:
    if snap.best is None:
        return f"best {snap.metric}: none yet"
    params = " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in snap.best_params.items())
    return f"best {snap.metric} {snap.best:.3f} (trial {snap.best_trial}: {params})"


def status_line(snap: Snapshot) -> str:
    """One plain line: trials by state, epochs, the ETA and the best so far."""
    eta = f", ETA ≤ {_duration(snap.eta_s)}" if snap.eta_s is not None else ""
    return (
        f"[{_duration(snap.elapsed_s)}] sweep {snap.name}: {_counts(snap)}; "
        f"epochs {snap.epochs_done}/{snap.epochs_total}{eta}; {_best(snap)}"
    )


class LiveSweep:
    """The watcher :func:`sweeps.driver.run_sweep` calls with each snapshot; a context manager."""

    def __init__(self, interval_s: float = 30.0) -> None:
        self.interval_s = interval_s
        self.terminal = console.is_terminal
        self.printed = 0.0
        self.last = ""  # the last status line printed: the final one is not printed twice
        self.live: Live | None = None
        self.bar = Progress(
            TextColumn("[bold]epochs"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console,
        )
        self.task = self.bar.add_task("epochs", total=None, eta="")
        self.text = Text()

    def __enter__(self) -> LiveSweep:
        self.printed = time.monotonic()
        if self.terminal:
            self.live = Live(
                Group(self.bar, self.text), console=console, refresh_per_second=4, transient=True
            )
            self.live.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def __call__(self, snap: Snapshot) -> None:
        for event in snap.events:
            console.print(
                f"[{_duration(snap.elapsed_s)}] {event}", highlight=False, soft_wrap=True, markup=False
            )
        if self.live is not None:
            eta = f"ETA ≤ {_duration(snap.eta_s)}" if snap.eta_s is not None else ""
            self.bar.update(self.task, completed=snap.epochs_done, total=max(snap.epochs_total, 1), eta=eta)
            self.text.plain = f"trials: {_counts(snap)}\n{_best(snap)}"
            return
        now = time.monotonic()
        line = status_line(snap)
        if (snap.final or now - self.printed >= self.interval_s) and line != self.last:
            console.print(line, highlight=False, soft_wrap=True, markup=False)
            self.printed, self.last = now, line
