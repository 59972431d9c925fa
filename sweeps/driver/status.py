"""A sweep's trials as rows (state, searched values, best metric, epochs, GPU ids, node), and
whether its driver is still running.

Rows come from Ray's trials: those of a finished ``Tuner.fit``, or those read back from the
experiment state in storage (:func:`read_status`, ``cxr-sweep sweep status``). A trial Ray still
counts as running is ``RUNNING`` while the sweep's driver lives and ``INTERRUPTED`` once it does
not: the driver writes :data:`DRIVER_FILE` (its state, host and pid) beside the experiment state.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

from ..space import FINAL_KEY, SweepSpec, load_saved_spec, searched_values, sweep_dir

__all__ = [
    "DRIVER_FILE",
    "STATES",
    "driver_alive",
    "mark_driver",
    "read_status",
    "saved_trials",
    "sweep_rows",
    "trial_rows",
    "trial_state",
]

#: A trial's state in a status row: finished (its test evaluation done), stopped early by the
#: scheduler, still running, interrupted (the sweep was stopped under it), failed, not started.
STATES = ("DONE", "STOPPED", "RUNNING", "INTERRUPTED", "ERROR", "PENDING")
DRIVER_FILE = "driver.json"  # in the sweep's folder: running | finished | interrupted | failed


def mark_driver(spec: SweepSpec, state: str) -> None:
    """Record the driver's state (and this process as the driver) in the sweep's folder."""
    if spec.remote_storage:
        return
    folder = Path(sweep_dir(spec))
    if not folder.is_dir():
        return
    record = {"state": state, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    tmp = folder / f".{DRIVER_FILE}.tmp"
    try:
        tmp.write_text(json.dumps(record))
        tmp.replace(folder / DRIVER_FILE)
    finally:  # a full disk: the old record stays, and no empty temporary file beside it
        tmp.unlink(missing_ok=True)


def driver_alive(spec: SweepSpec) -> bool:
    """Whether the sweep's driver runs now: its record says running and, on this host, its process
    exists. A sweep with no record (remote storage, or written before records) counts as not."""
    try:
        record = json.loads((Path(sweep_dir(spec)) / DRIVER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if record.get("state") != "running":
        return False
    if record.get("host") != socket.gethostname():
        return True  # another machine's driver: trust its record
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False  # killed without a word (SIGKILL, a crash): its trials were interrupted
    except (PermissionError, KeyError, ValueError, TypeError):
        pass
    return True


def trial_state(trial, *, live: bool) -> str:
    """One of :data:`STATES` for a Ray ``Trial`` (``live``: its driver still runs)."""
    m = trial.last_result or {}
    reported = "epochs_done" in m  # Ray fills a trial that never reported with defaults
    if trial.status == "ERROR":
        return "ERROR"
    if m.get(FINAL_KEY):
        return "DONE"
    if trial.status == "TERMINATED":
        return "STOPPED" if reported else "PENDING"
    if trial.status in ("RUNNING", "PAUSED") or reported:
        return "RUNNING" if live else "INTERRUPTED"
    return "PENDING"


def trial_rows(trials, spec: SweepSpec, *, live: bool) -> list[dict[str, Any]]:
    """One row per Ray ``Trial``; ``live``: whether the driver still runs them (else unfinished
    trials that had started are INTERRUPTED)."""
    rows = []
    for t in trials:
        m = t.last_result or {}
        state = trial_state(t, live=live)
        # trials report their best value so far every epoch (best_<metric>): the value a stopped or
        # interrupted trial is ranked by, not its last epoch's
        best = m.get(f"best_{spec.metric}", m.get(spec.metric))
        rows.append(
            {
                "trial": str(t.trial_id),
                "path": getattr(t, "path", None),
                "state": state,
                "params": searched_values(spec, t.config or {}),
                "best": float(best) if best is not None else float("nan"),
                "epochs": int(m.get("epochs_done", 0)),
                "gpu_ids": m.get("gpu_ids", ""),
                "node_id": str(m.get("node_id", ""))[:8],
                "error": _last_line(t.get_error()) if state == "ERROR" else "",
            }
        )
    return rows


def _last_line(text: str | None) -> str:
    """The exception line of a trial's error trace."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "failed (no error text recorded)"


def sweep_rows(results, spec: SweepSpec, *, live: bool = False) -> list[dict[str, Any]]:
    """The rows of a Ray ``ResultGrid`` (a finished ``Tuner.fit``), read from its experiment state."""
    return trial_rows(saved_trials(results.experiment_path, results.filesystem), spec, live=live)


def saved_trials(path: str, filesystem=None) -> list:
    """Ray's trials as its experiment state in ``path`` holds them."""
    from ray import tune

    return list(tune.ExperimentAnalysis(path, storage_filesystem=filesystem).trials)


def read_status(name_or_path: str, storage: str | Path | None = None):
    """The spec and per-trial rows of a sweep, read from Ray's experiment state on storage."""
    from ray import tune

    spec, _ = load_saved_spec(name_or_path, storage)
    if not tune.Tuner.can_restore(sweep_dir(spec)):
        raise ConfigError(
            f"{sweep_dir(spec)}: no Ray experiment state yet (the sweep has not started a trial)"
        )
    return spec, trial_rows(saved_trials(sweep_dir(spec)), spec, live=driver_alive(spec))
