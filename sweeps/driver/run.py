"""The sweep driver: a validated sweep → Ray Tune (OptunaSearch / random / grid, ASHA) → MLflow.

``run_sweep(path)`` validates everything before any trial starts (:mod:`sweeps.space`,
:mod:`sweeps.driver.preflight`), opens one MLflow parent run, and runs the Tuner with retries from
checkpoints; the driver's callback (:mod:`sweeps.tracking.callback`) writes every trial's run.
``resume_sweep(name)`` continues an interrupted sweep (``Tuner.restore``) without re-running
finished trials.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

from ..space import SweepSpec, load_saved_spec, load_sweep, save_spec, sweep_dir
from .preflight import check_shared_storage, check_sweep
from .status import sweep_rows
from .tuner import build_tuner, init_ray

__all__ = ["SweepOutcome", "resume_sweep", "run_sweep"]


@dataclass
class SweepOutcome:
    name: str
    path: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    metrics_logged: int


def _execute(spec: SweepSpec, *, space_file: str | None, address: str | None, restore: bool) -> SweepOutcome:
    uri = check_sweep(spec, address)
    init_ray(address)
    if address not in (None, "", "local"):
        check_shared_storage(spec)
    from ..tracking.callback import MlflowSweepCallback
    from ..tracking.parent import close_parent_run, fail_parent_run, open_parent_run

    exp_id, parent = open_parent_run(uri, spec, space_file, restore)
    try:
        save_spec(spec, space_file)
        callback = MlflowSweepCallback(uri, exp_id, parent, spec)
        results = build_tuner(spec, [callback], restore).fit()
    except BaseException as e:
        fail_parent_run(uri, parent, e)
        raise
    rows = sweep_rows(results, spec)
    close_parent_run(uri, parent, spec, rows)
    return SweepOutcome(
        spec.name, sweep_dir(spec), uri, spec.experiment, parent, rows, callback.logged_metrics
    )


def run_sweep(
    space_file: str | Path,
    *,
    address: str | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> SweepOutcome:
    """Validate and run the sweep in ``space_file``; return a :class:`SweepOutcome`.

    A sweep of the same name already in storage is an error (resume it instead) unless
    ``overwrite``, which deletes its Ray results (its MLflow runs stay, under the old parent).
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
    return _execute(spec, space_file=str(Path(space_file).resolve()), address=address, restore=False)


def resume_sweep(name_or_path: str, *, storage: str | Path | None = None, address: str | None = None):
    """Continue an interrupted sweep: finished trials are kept, unfinished and errored ones resume."""
    spec, space_file = load_saved_spec(name_or_path, storage)
    from ray import tune

    if not tune.Tuner.can_restore(sweep_dir(spec)):
        raise ConfigError(f"{sweep_dir(spec)}: no Ray experiment state to resume")
    return _execute(spec, space_file=space_file, address=address, restore=True)
