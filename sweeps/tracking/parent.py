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

__all__ = ["close_parent_run", "fail_parent_run", "log_to_parent_runs", "open_parent_run"]


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
            client.update_run(found[0].info.run_id, status="RUNNING")
            return exp_id, found[0].info.run_id
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
    """Trial counts and the best trial (status rows of :mod:`sweeps.driver.status`), then FINISHED."""
    client = MlflowClient(uri)
    done = [r for r in rows if r["state"] == "DONE"]
    client.log_metric(parent, "trials", len(rows))
    client.log_metric(parent, "trials_done", len(done))
    client.log_metric(parent, "trials_failed", sum(r["state"] == "ERROR" for r in rows))
    if done:
        sign = 1 if spec.mode == "max" else -1
        best = max(done, key=lambda r: (sign * r["best"], r["trial"]))
        client.log_metric(parent, f"best_{spec.metric}", best["best"])
        client.set_tag(parent, "cxr.best_trial", best["trial"])
    client.set_terminated(parent, "FINISHED")


def fail_parent_run(uri: str, parent: str, error: BaseException) -> None:
    """The sweep stopped on ``error``: tag it and end the run KILLED (Ctrl-C) or FAILED."""
    client = MlflowClient(uri)
    client.set_tag(parent, "error", f"{type(error).__name__}: {error}"[:4000])
    client.set_terminated(parent, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def log_to_parent_runs(uri: str, parents: dict[str, str], files: Iterable[Path], artifact_path: str) -> None:
    """Log ``files`` under ``artifact_path`` to every parent run in ``parents`` (sweep → run id)."""
    client = MlflowClient(uri)
    files = list(files)
    for parent in parents.values():
        for path in files:
            client.log_artifact(parent, str(path), artifact_path=artifact_path)
