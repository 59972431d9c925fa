"""The sweep's MLflow parent run: opened before any trial, closed with the sweep's outcome.

Experiment = the sweep's experiment name. The parent run (``cxr.kind=sweep``) holds the search
space file, the git commit and the sweep folder as tags, the search settings as params, and at the
end the trial counts and the best value of the sweep metric. Trial runs are its children
(:mod:`sweeps.tracking.callback`). Files made from a finished sweep (``report``) are logged to it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainer.errors import ConfigError

from ..space import SweepSpec, sweep_dir
from .runs import experiment_id
from .store import CREDENTIAL_VARS

__all__ = [
    "INTERRUPTED_TAG",
    "close_parent_run",
    "end_open_trial_runs",
    "fail_parent_run",
    "log_to_parent_runs",
    "open_parent_run",
]

INTERRUPTED_TAG = "cxr.interrupted"  # on a run that ended KILLED because its sweep was interrupted


def open_parent_run(uri: str, spec: SweepSpec, space_file: str | None, restore: bool) -> tuple[str, str]:
    """(experiment id, parent run id): a new parent run, or on resume the one the sweep started with.

    A refused write (a read-only user) is a :class:`ConfigError` that says what to ask for.
    """
    try:
        return _parent_run(MlflowClient(uri), uri, spec, space_file, restore)
    except MlflowException as e:
        if e.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise ConfigError(
                f"mlflow.tracking_uri: {uri} refused to record the sweep in experiment "
                f"{spec.experiment!r} ({e.error_code}): ask its admin for EDIT permission on it, or "
                f"use other credentials ({CREDENTIAL_VARS})"
            ) from None
        raise


def _parent_run(client, uri: str, spec: SweepSpec, space_file: str | None, restore: bool) -> tuple[str, str]:
    exp_id = experiment_id(client, spec.experiment, uri)
    if restore:
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`cxr.kind` = 'sweep' and tags.`cxr.sweep_dir` = '{sweep_dir(spec)}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            if INTERRUPTED_TAG in found[0].data.tags:
                client.delete_tag(run_id, INTERRUPTED_TAG)
            return exp_id, run_id
    tags = {
        "cxr.kind": "sweep",
        "cxr.sweep_dir": sweep_dir(spec),
        "cxr.search_space_file": space_file or "",
        "cxr.git_commit": _git_commit(space_file),
    }
    run = client.create_run(exp_id, run_name=spec.name, tags=tags)
    for key, value in {
        "search.algorithm": spec.search.algorithm,
        "search.seed": spec.search.seed,
        "scheduler": spec.scheduler.type,
        "num_samples": spec.num_samples,
        "metric": spec.metric,
        "mode": spec.mode,
        "resources.cpu": spec.resources.cpu,
        "resources.gpu": spec.resources.gpu,
        "max_failures": spec.max_failures,
        "params": ", ".join(spec.params),
        **(
            {"objectives": ",".join(spec.all_metrics), "modes": ",".join(spec.all_modes)}
            if spec.objectives
            else {}
        ),
        **({"repeats": spec.repeats} if spec.repeats > 1 else {}),
        **({"search.sampler": spec.search.sampler} if spec.search.algorithm == "optuna" else {}),
        **({"search.warm_start": spec.search.warm_start} if spec.search.warm_start else {}),
    }.items():
        client.log_param(run.info.run_id, key, str(value))
    return exp_id, run.info.run_id


def _git_commit(space_file: str | None) -> str:
    where = Path(space_file).resolve().parent if space_file else Path.cwd()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def close_parent_run(uri: str, parent: str, spec: SweepSpec, rows: list[dict[str, Any]]) -> None:
    """Trial counts and the best trial (status rows of :mod:`sweeps.driver.status`), then FINISHED,
    or FAILED when every trial failed."""
    client = MlflowClient(uri)
    done = [r for r in rows if r["state"] == "DONE"]
    failed = [r for r in rows if r["state"] == "ERROR"]
    client.log_metric(parent, "trials", len(rows))
    client.log_metric(parent, "trials_done", len(done))
    client.log_metric(parent, "trials_failed", len(failed))
    if done:
        sign = 1 if spec.mode == "max" else -1
        best = max(done, key=lambda r: (sign * r["best"], r["trial"]))
        client.log_metric(parent, f"best_{spec.metric}", best["best"])
        client.set_tag(parent, "cxr.best_trial", best["trial"])
    if rows and len(failed) == len(rows):
        client.set_tag(parent, "error", f"every trial failed; the first: {failed[0]['error']}"[:4000])
        client.set_terminated(parent, "FAILED")
        return
    client.set_terminated(parent, "FINISHED")


def fail_parent_run(uri: str, parent: str, error: BaseException | str, *, interrupted: bool = False) -> None:
    """The sweep stopped: the parent run ends KILLED with :data:`INTERRUPTED_TAG` (an interruption),
    or FAILED with the error as its ``error`` tag; so does every child run still RUNNING."""
    client = MlflowClient(uri)
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    if interrupted:
        client.set_tag(parent, INTERRUPTED_TAG, "true")
    else:
        client.set_tag(parent, "error", text[:4000])
    end_open_trial_runs(uri, parent, interrupted=interrupted, reason=text)
    client.set_terminated(parent, "KILLED" if interrupted else "FAILED")


def end_open_trial_runs(uri: str, parent: str, *, interrupted: bool, reason: str) -> list[str]:
    """End the parent's child runs (and their seed runs) still RUNNING: KILLED +
    :data:`INTERRUPTED_TAG` (resume reopens them) or FAILED with ``reason``. Returns their run ids."""
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    open_runs = client.search_runs(
        [exp],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'",
        max_results=10000,
    )
    # seed repeats: each seed's run is nested under its configuration's run
    configs = {
        r.info.run_id
        for r in client.search_runs(
            [exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=50000
        )
    }
    open_seeds = client.search_runs(
        [exp], filter_string="tags.`cxr.kind` = 'seed' and attributes.status = 'RUNNING'", max_results=50000
    )
    open_runs += [r for r in open_seeds if r.data.tags.get("mlflow.parentRunId") in configs]
    for run in open_runs:
        if interrupted:
            client.set_tag(run.info.run_id, INTERRUPTED_TAG, "true")
        else:
            client.set_tag(run.info.run_id, "error", f"the sweep failed: {reason}"[:4000])
        client.set_terminated(run.info.run_id, "KILLED" if interrupted else "FAILED")
    return [r.info.run_id for r in open_runs]


def log_to_parent_runs(uri: str, parents: dict[str, str], files: Iterable[Path], artifact_path: str) -> None:
    """Log ``files`` under ``artifact_path`` to every parent run in ``parents`` (sweep → run id)."""
    client = MlflowClient(uri)
    files = list(files)
    for parent in parents.values():
        for path in files:
            client.log_artifact(parent, str(path), artifact_path=artifact_path)
