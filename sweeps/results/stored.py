"""A finished run's stored test predictions (``predictions/predictions.csv``), as the comparisons
and the intervals of reports read them: one run's ``(n, C)`` probabilities, or the ``(k, n, C)`` of a
configuration trained with k seeds (its seed runs, nested under it)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..tracking.lookup import RunRow, SelectionError
from ..tracking.runs import PREDICTIONS_FILE

__all__ = ["load_test_predictions", "read_test_predictions", "seed_runs", "stored_intervals"]


def read_test_predictions(client, run: RunRow, where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cache rows, labels, class probabilities) of a run's test images."""
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file
    try:
        path = client.download_artifacts(run.run_id, f"predictions/{PREDICTIONS_FILE}", str(where))
    except (MlflowException, OSError):
        raise SelectionError(
            f"run {run.run_id} ({run.run_name}) has no predictions/{PREDICTIONS_FILE}: it finished "
            "before trials stored their per-image predictions; run it again to compare it"
        ) from None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    if not rows:
        raise SelectionError(f"run {run.run_id} ({run.run_name}): its predictions hold no test images")
    classes = [k for k in rows[0] if k.startswith("p_")]
    idx = np.array([int(r["row"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([[float(r[k]) for k in classes] for r in rows])
    return idx, labels, probs


def seed_runs(client, run: RunRow) -> list[RunRow]:
    """The finished seed runs of a configuration trained with repeats, in seed order; else []."""
    from ..tracking.lookup import row_from_run

    if "cxr.repeats" not in run.tags:
        return []
    exp = client.get_run(run.run_id).info.experiment_id
    found = client.search_runs(
        [exp],
        filter_string=f"tags.mlflow.parentRunId = '{run.run_id}' and tags.`cxr.kind` = 'seed'",
        max_results=1000,
    )
    rows = [row_from_run(r, run.experiment) for r in found if r.info.status == "FINISHED"]
    if len(rows) < int(run.tags["cxr.repeats"]):
        raise SelectionError(
            f"run {run.run_id} ({run.run_name}) trained {run.tags['cxr.repeats']} seeds but "
            f"{len(rows)} of their runs are finished"
        )
    return sorted(rows, key=lambda r: int(r.tags.get("cxr.seed_index", 0)))


def load_test_predictions(
    client, run: RunRow, where: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[RunRow]]:
    """(cache rows, labels, probabilities, seed runs) of one side: one run's ``(n, C)``, or the
    ``(k, n, C)`` of a repeated configuration's seeds (all on the same images)."""
    seeds = seed_runs(client, run)
    if not seeds:
        return (*read_test_predictions(client, run, where), [])
    parts = [read_test_predictions(client, s, where / s.run_id) for s in seeds]
    idx, labels, _ = parts[0]
    for s, (i, y, _) in zip(seeds, parts, strict=True):
        if not (np.array_equal(i, idx) and np.array_equal(y, labels)):
            raise SelectionError(
                f"the seeds of {run.run_name} were tested on different images ({s.run_name})"
            )
    return idx, labels, np.stack([p for _, _, p in parts]), seeds


def stored_intervals(tracking_uri: str, where: Path, n_resamples: int = 2000, seed: int = 0):
    """A run → the 95 % bootstrap interval of each of its test metrics, from its stored predictions
    (downloaded into ``where``), for ``report --ci``."""
    from mlflow.tracking import MlflowClient

    from .stats import bootstrap_intervals

    if n_resamples < 200:
        raise SelectionError(f"--resamples {n_resamples}: an interval needs at least 200 (2000 is usual)")
    client = MlflowClient(tracking_uri)

    def intervals(run: RunRow) -> dict[str, tuple[float, float]]:
        _, labels, probs, _ = load_test_predictions(client, run, where / run.run_id)
        return bootstrap_intervals(labels, probs, n_resamples=n_resamples, seed=seed)

    return intervals
