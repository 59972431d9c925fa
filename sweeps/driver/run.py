"""The sweep driver: a validated sweep → Ray Tune (OptunaSearch / random / grid, ASHA) → MLflow.

``run_sweep(path)`` validates everything before any trial starts (:mod:`sweeps.space`,
:mod:`sweeps.driver.preflight`), opens one MLflow parent run, and runs the Tuner with retries from
checkpoints; the driver's callback (:mod:`sweeps.tracking.callback`) writes every trial's run.
``resume_sweep(name)`` continues an interrupted sweep (``Tuner.restore``) without re-running
finished trials.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from trainer.errors import ConfigError

from ..space import SweepSpec, load_saved_spec, load_sweep, save_spec, sweep_dir
from .failure import SweepFailed, SweepInterrupted, is_storage_full, one_line, root_cause, write_traceback
from .preflight import check_shared_storage, check_sweep
from .status import driver_alive, mark_driver, sweep_rows
from .tuner import build_tuner, init_ray

if TYPE_CHECKING:
    from .progress import Snapshot

__all__ = ["SweepOutcome", "resume_sweep", "run_sweep"]

OUT_OF_SPACE_GRACE_S = 5.0  # how long a full storage's tracking writes are retried before the stop


@dataclass
class SweepOutcome:
    name: str
    path: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    metrics_logged: int
    mode: str = "max"  # the metric's direction: how rows rank


def _execute(
    spec: SweepSpec,
    *,
    space_file: str | None,
    address: str | None,
    restore: bool,
    watch: Callable[[Snapshot], None] | None = None,
) -> SweepOutcome:
    uri = check_sweep(spec, address)
    warm = None
    if not restore and spec.search.warm_start:  # a resumed searcher holds them in its saved state
        from .warm import warm_start

        warm = warm_start(spec, uri)
        print(warm.describe())
    init_ray(address)
    if address not in (None, "", "local"):
        check_shared_storage(spec)
    from ..tracking.callback import MlflowSweepCallback
    from ..tracking.parent import close_parent_run, fail_parent_run, open_parent_run
    from .progress import SweepProgress, last_snapshot, watching

    exp_id, parent = open_parent_run(uri, spec, space_file, restore)
    callback = None
    guard = _storage_guard(spec, lambda: callback)
    try:
        save_spec(spec, space_file)
        mark_driver(spec, "running")
        callback = MlflowSweepCallback(uri, exp_id, parent, spec)
        with watching(watch):
            results = build_tuner(spec, [guard, SweepProgress(spec), callback], restore, warm).fit()
        rows = sweep_rows(results, spec)
    except KeyboardInterrupt:  # a second Ctrl-C while Ray was stopping: its last saved state resumes
        _settle(callback)
        if guard.full is not None:
            _out_of_space(spec, uri, parent, guard.full)
        fail_parent_run(uri, parent, "interrupted", interrupted=True)
        mark_driver(spec, "interrupted")
        raise SweepInterrupted(spec, _saved_rows(spec)) from None
    except BaseException as e:
        _settle(callback)
        if guard.full is not None or is_storage_full(e):
            _out_of_space(spec, uri, parent, guard.full or f"storage_path {spec.storage_path}: {one_line(e)}")
        _failed(spec, uri, parent, e, keep=restore)
    if guard.full is not None:
        _out_of_space(spec, uri, parent, guard.full)
    final = last_snapshot()
    interrupted = final.interrupted if final is not None and final.final else _unfinished(rows)
    if interrupted:
        fail_parent_run(uri, parent, "interrupted", interrupted=True)
        mark_driver(spec, "interrupted")
        raise SweepInterrupted(spec, rows)
    close_parent_run(uri, parent, spec, rows)
    if rows and all(r["state"] == "ERROR" for r in rows):
        mark_driver(spec, "failed")
        first = rows[0]
        raise SweepFailed(
            spec,
            f"every trial of sweep {spec.name!r} failed; trial {first['trial']}: {first['error']} "
            f"(its error file is in {first['path']})",
            rows,
        )
    mark_driver(spec, "finished")
    return SweepOutcome(
        spec.name, sweep_dir(spec), uri, spec.experiment, parent, rows, callback.logged_metrics, spec.mode
    )


def _storage_guard(spec: SweepSpec, callback: Callable[[], Any]):
    """The driver's :class:`~sweeps.driver.storage_guard.StorageGuard`: it measures local storage
    only (remote storage, e.g. S3, has no free space to watch; an ENOSPC raised in the driver
    still ends the sweep as out of space). Once the storage is full, the tracking callback waits
    only briefly for a store that may be on it (``callback()``: the callback, made after the guard)."""
    from .storage_guard import StorageGuard

    def shorten_wait() -> None:
        if (cb := callback()) is not None:
            cb.end_grace_s = OUT_OF_SPACE_GRACE_S

    if spec.remote_storage:
        guard = StorageGuard(spec.storage_path, on_full=shorten_wait)
        guard.free_bytes = lambda: None  # type: ignore[method-assign]
        return guard
    return StorageGuard(spec.storage_path, folder=sweep_dir(spec), on_full=shorten_wait)


def _out_of_space(spec: SweepSpec, uri: str, parent: str, reason: str) -> NoReturn:
    """The storage filled up: the sweep stopped, and stays resumable (nothing of it is deleted).
    The runs are ended if the store still takes writes (if it is on the full disk, the resume
    ends them)."""
    from ..tracking.parent import fail_parent_run

    with contextlib.suppress(Exception):
        fail_parent_run(uri, parent, reason, interrupted=True)
    with contextlib.suppress(OSError):
        mark_driver(spec, "interrupted")
    resume = f"cxr-sweep sweep resume {spec.name} --storage {spec.storage_path}"
    raise SweepFailed(
        spec,
        f"sweep {spec.name!r} stopped: {reason}. Its trials and checkpoints are kept: free space, "
        f"then continue it with `{resume}`",
        _saved_rows(spec),
    ) from None


def _settle(callback, grace_s: float = 10.0) -> None:
    """Let the tracking writer log what it was given (briefly: the store may be what failed) before
    the runs still open are ended: nothing it writes later may reopen or extend them."""
    if callback is not None:
        with contextlib.suppress(Exception):  # the sweep fails with its own error, not this one
            callback.writer.drain(grace_s, raise_error=False)
        callback.writer.close()


def _failed(spec: SweepSpec, uri: str, parent: str, error: BaseException, *, keep: bool) -> NoReturn:
    """A failure after the checks: the traceback to a log file, no run left RUNNING, one line raised.
    A new sweep that had finished no trial leaves nothing in storage that would block its name
    (a resumed one, ``keep``, stays resumable)."""
    from ..tracking.parent import fail_parent_run

    cause = root_cause(error)
    log = write_traceback(spec, error)
    with contextlib.suppress(Exception):  # the store itself may be what failed
        fail_parent_run(uri, parent, one_line(cause))
    rows = _saved_rows(spec)
    if not keep and not spec.remote_storage and not any(r["state"] in ("DONE", "STOPPED") for r in rows):
        shutil.rmtree(sweep_dir(spec), ignore_errors=True)
    else:
        mark_driver(spec, "failed")
    raise SweepFailed(
        spec, f"sweep {spec.name!r} failed: {one_line(cause)} (traceback: {log})", rows, log
    ) from None


def _saved_rows(spec: SweepSpec) -> list[dict[str, Any]]:
    """The trials as Ray last saved them (none if it saved nothing)."""
    from .status import saved_trials, trial_rows

    try:
        return trial_rows(saved_trials(sweep_dir(spec)), spec, live=False)
    except Exception:
        return []


def _unfinished(rows: list[dict[str, Any]]) -> bool:
    return any(r["state"] in ("RUNNING", "INTERRUPTED", "PENDING") for r in rows)


def run_sweep(
    space_file: str | Path,
    *,
    address: str | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    watch: Callable[[Snapshot], None] | None = None,
) -> SweepOutcome:
    """Validate and run the sweep in ``space_file``; return a :class:`SweepOutcome`.

    A sweep of the same name already in storage is an error (resume it instead) unless
    ``overwrite``, which deletes its Ray results (its MLflow runs stay, under the old parent).
    ``watch`` receives a :class:`~sweeps.driver.progress.Snapshot` as the sweep runs.

    A failure after the checks raises :class:`~sweeps.driver.failure.SweepFailed` (one line; the
    traceback in a log file), an interruption :class:`~sweeps.driver.failure.SweepInterrupted`.
    """
    spec, _ = load_sweep(space_file, overrides=overrides)
    existing = Path(sweep_dir(spec))
    if not spec.remote_storage and existing.exists():
        if not overwrite:
            raise ConfigError(
                f"sweep {spec.name!r} already exists in {existing}: continue it with "
                f"`cxr-sweep sweep resume {spec.name} --storage {spec.storage_path}`, pick another name "
                "(--set name=...), or start over with --overwrite"
            )
        shutil.rmtree(existing)
    return _execute(
        spec, space_file=str(Path(space_file).resolve()), address=address, restore=False, watch=watch
    )


def resume_sweep(
    name_or_path: str,
    *,
    storage: str | Path | None = None,
    address: str | None = None,
    watch: Callable[[Snapshot], None] | None = None,
) -> SweepOutcome:
    """Continue an interrupted sweep: finished trials are kept, unfinished and errored ones resume."""
    spec, space_file = load_saved_spec(name_or_path, storage)
    from ray import tune

    if not tune.Tuner.can_restore(sweep_dir(spec)):
        raise ConfigError(f"{sweep_dir(spec)}: no Ray experiment state to resume")
    if driver_alive(spec):
        raise ConfigError(f"sweep {spec.name!r} is running now (its driver is alive): wait, or stop it first")
    if not spec.remote_storage:
        from .storage_guard import StateCutShort, repair_state

        try:
            restored = repair_state(Path(sweep_dir(spec)))
        except StateCutShort as e:
            raise ConfigError(str(e)) from None
        if restored:
            saved = ", ".join(restored)
            print(
                "Ray's state was cut short (its disk filled while Ray wrote it): "
                f"restored its last whole save ({saved})"
            )
    return _execute(spec, space_file=space_file, address=address, restore=True, watch=watch)
