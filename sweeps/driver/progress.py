"""A sweep as it runs, for whoever watches it: trial states, epochs done and left, the best value
so far and its configuration, an ETA, and one line per trial that starts, finishes or fails.

:class:`SweepProgress` is a Tune callback in the driver. Ray pickles callbacks with the
experiment and a resumed sweep unpickles them, so the callback holds no display: it hands each
:class:`Snapshot` to the function set by :func:`watching` in this process (none: it only keeps
the last one). The last snapshot also says whether the sweep ended with trials unfinished, i.e.
was interrupted (:func:`last_snapshot`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from ..space import SweepSpec, searched_values
from .status import trial_state

__all__ = ["Snapshot", "SweepProgress", "last_snapshot", "watching"]


@dataclass(frozen=True)
class Snapshot:
    name: str
    metric: str
    total: int  # trials the search runs
    counts: dict[str, int]  # trials by state (sweeps.driver.status.STATES)
    epochs_done: int
    epochs_total: int  # at most: the scheduler may stop trials before their last epoch
    best: float | None  # the best value of the metric so far (each trial's best epoch)
    best_trial: str | None
    best_params: dict[str, Any]
    eta_s: float | None  # epochs left × mean epoch time ÷ trials running: an upper bound
    elapsed_s: float
    events: tuple[str, ...] = ()  # since the previous snapshot, one line each
    final: bool = False
    interrupted: bool = False  # final, with trials unfinished or never started
    epoch_s: float | None = None  # mean seconds per epoch of the trials so far


_watcher: Callable[[Snapshot], None] | None = None
_last: Snapshot | None = None


@contextlib.contextmanager
def watching(watcher: Callable[[Snapshot], None] | None) -> Iterator[None]:
    """Send every snapshot of the sweep run inside to ``watcher``."""
    global _watcher, _last
    _watcher, _last = watcher, None
    try:
        yield
    finally:
        _watcher = None


def last_snapshot() -> Snapshot | None:
    """The latest snapshot of the sweep last run in this process (the final one once it ended)."""
    return _last


class SweepProgress(Callback):
    MIN_INTERVAL_S = 0.5  # between snapshots without news

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.total = spec.num_samples
        self.started = time.monotonic()
        self.sent = 0.0
        self.events: list[str] = []
        # trials that ended on their own (complete or failed), and those a resumed sweep starts with
        # ended: at the end of an interrupted sweep Ray terminates the others without a word
        self.ended: set[str] | None = None

    def __getstate__(self) -> dict:
        return {"spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"])

    # -- Tune hooks -----------------------------------------------------------------------------------
    def setup(self, **info) -> None:
        self.total = int(info.get("total_num_samples") or self.total)
        self.started = time.monotonic()

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self.ended is None:
            self.ended = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self.sent >= self.MIN_INTERVAL_S:
            self._send(trials)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.events.append(f"trial {trial.trial_id} started: {_params(self.spec, trial)}")
        self._send(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended(trial)
        m = trial.last_result or {}
        best = m.get(f"best_{self.spec.metric}")
        value = f"best {self.spec.metric} {best:.3f}" if isinstance(best, int | float) else "no value"
        if trial_state(trial, live=True) == "DONE":
            what = f"done: {value} after {m.get('epochs_done', 0)} epochs"
        else:
            what = f"stopped by the scheduler after {m.get('epochs_done', 0)} epochs: {value}"
        self.events.append(f"trial {trial.trial_id} {what}")
        self._send(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trial)
        text = [line for line in (trial.get_error() or "").splitlines() if line.strip()]
        self.events.append(f"trial {trial.trial_id} failed: {text[-1].strip() if text else 'no error text'}")
        self._send(trials)

    def on_experiment_end(self, trials, **info) -> None:
        self.on_step_begin(0, trials)  # a resumed sweep with nothing left to run takes no step
        ended = self.ended or set()
        unfinished = any(t.trial_id not in ended for t in trials)
        self._send(trials, final=True, interrupted=unfinished or len(trials) < self.total)

    def _ended(self, trial) -> None:
        if self.ended is None:
            self.ended = set()
        self.ended.add(trial.trial_id)

    # -- the snapshot -----------------------------------------------------------------------------------
    def _send(self, trials, *, final: bool = False, interrupted: bool = False) -> None:
        global _last
        snap = self.snapshot(trials, final=final, interrupted=interrupted)
        self.events = []
        self.sent = time.monotonic()
        _last = snap
        if _watcher is not None:
            _watcher(snap)

    def snapshot(self, trials, *, final: bool = False, interrupted: bool = False) -> Snapshot:
        spec = self.spec
        planned = int(spec.trial.get("train", {}).get("epochs", 1))
        counts: dict[str, int] = {}
        done = total = 0
        times = []
        best, best_trial, best_params = None, None, {}
        sign = 1.0 if spec.mode == "max" else -1.0
        ended = self.ended or set()
        for t in trials:
            state = trial_state(t, live=not final)
            if final and t.trial_id not in ended and state in ("STOPPED", "PENDING"):
                state = "INTERRUPTED" if state == "STOPPED" else "PENDING"  # terminated by the interruption
            counts[state] = counts.get(state, 0) + 1
            m = t.last_result or {}
            epochs = int(m.get("epochs_done", 0))
            done += epochs
            total += epochs if state in ("DONE", "STOPPED", "ERROR") else max(planned, epochs)
            if isinstance(m.get("epoch_time_s"), int | float):
                times.append(float(m["epoch_time_s"]))
            value = m.get(f"best_{spec.metric}")
            if isinstance(value, int | float) and (best is None or sign * value > sign * best):
                best, best_trial, best_params = (
                    float(value),
                    t.trial_id,
                    searched_values(spec, t.config or {}),
                )
        unseen = max(0, self.total - len(trials))
        counts["PENDING"] = counts.get("PENDING", 0) + unseen
        total += unseen * planned
        epoch_s = sum(times) / len(times) if times else None
        running = max(1, counts.get("RUNNING", 0))
        eta = (total - done) * epoch_s / running if epoch_s is not None and not final else None
        return Snapshot(
            name=spec.name,
            metric=spec.metric,
            total=self.total,
            counts={k: v for k, v in counts.items() if v},
            epochs_done=done,
            epochs_total=max(total, done),
            best=best,
            best_trial=best_trial,
            best_params=best_params,
            eta_s=eta,
            elapsed_s=time.monotonic() - self.started,
            events=tuple(self.events),
            final=final,
            interrupted=interrupted,
            epoch_s=epoch_s,
        )


def _params(spec: SweepSpec, trial) -> str:
    values = searched_values(spec, trial.config or {})
    return " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in values.items()) or "(no searched values)"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
