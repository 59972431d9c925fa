"""MLflow logging of a run: params, metrics, plots and tags, with secrets redacted (DESIGN.md §4).

A trial's run holds the full config as params, per-epoch metrics with ``step=epoch``,
``best_val_*`` and ``test_*`` summaries, and artifacts: the resolved config, ROC and
confusion-matrix plots, and the Grad-CAM overlay grid only for datasets marked public or
synthetic (patient images stay on the cluster otherwise). A failed trial's run ends FAILED
with the error in the ``error`` tag.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from trainer.config import TrialConfig

__all__ = [
    "CAM_ZERO_TAG",
    "MAX_ERROR",
    "MODEL_URI_TAG",
    "PREDICTIONS_FILE",
    "SEARCH_CONFIG_TAG",
    "TrialRun",
    "dataset_tags",
    "experiment_id",
    "log_metrics",
    "log_params",
    "log_plots",
    "log_predictions",
    "log_steps",
    "log_text_file",
    "redact",
    "run_title",
    "search_config_tag",
]

PREDICTIONS_FILE = "predictions.csv"  # as trainer.loop writes it (tests check they agree)
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch
MAX_ERROR = 4000  # characters of an error kept in the run's `error` tag
MODEL_URI_TAG = "cxr.model_uri"  # where a finished trial's model.pt lies (read by `cxr-sweep export`)
CAM_ZERO_TAG = "cxr.cam_all_zero"  # a training epoch whose CAMs were all zero: the attention term did nothing
SEARCH_CONFIG_TAG = "cxr.search_config"  # the values the searcher drew (the Ray trial config, JSON)


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a sqlite store) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # keep artifacts beside the database, not in whatever the cwd happens to be
        artifact_location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# Environment variables whose values must never reach MLflow (credentials of the stack, cloud keys)
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
_URL_CREDENTIALS = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]+):[^@/\s]+@", re.I)


def redact(text: str) -> str:
    """``text`` with URL passwords and the values of secret-named environment variables masked."""
    text = _URL_CREDENTIALS.sub(r"\g<head>:***@", text)
    for name, value in os.environ.items():
        if len(value) >= 4 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def log_text_file(
    client: MlflowClient, run_id: str, path: str | Path, artifact_path: str | None = None
) -> None:
    """Upload a text artifact (the resolved config) with secrets redacted (:func:`redact`)."""
    import tempfile

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / path.name
        clean.write_text(redact(path.read_text(errors="replace")))
        client.log_artifact(run_id, str(clean), artifact_path=artifact_path)


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log ``params`` in batches (MLflow takes at most 100 per call), values truncated to its limit
    and secrets redacted (:func:`redact`)."""
    items = [Param(k, redact(str(v))[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i : i + _BATCH])


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` MLflow can store: finite numbers (not booleans), as floats."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0) -> int:
    """Log the finite numeric entries of ``metrics`` at ``step``; return how many were logged."""
    return log_steps(client, run_id, [(metrics, step)])


_MAX_METRICS = 1000  # MLflow's limit per log_batch


def log_steps(client: MlflowClient, run_id: str, rows: list[tuple[dict[str, Any], int]]) -> int:
    """Log several steps' metrics (``(metrics, step)`` rows, in order) in as few requests as MLflow
    allows; return how many values were logged. A request holds whole steps only (one step's values
    are more than one request only past MLflow's limit), so a step whose first value is in the store
    is there entirely: what a replay after a lost response relies on."""
    now = int(time.time() * 1000)
    batch: list[Metric] = []
    count = 0
    for metrics, step in rows:
        items = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
        count += len(items)
        if batch and len(batch) + len(items) > _MAX_METRICS:
            client.log_batch(run_id, metrics=batch)
            batch = []
        batch += items
        while len(batch) > _MAX_METRICS:
            client.log_batch(run_id, metrics=batch[:_MAX_METRICS])
            batch = batch[_MAX_METRICS:]
    if batch:
        client.log_batch(run_id, metrics=batch)
    return count


def log_predictions(client: MlflowClient, run_id: str, path: str | Path) -> None:
    """A trial's per-image predictions (``predictions.csv``: split, cache row, label, class
    probabilities; no identifier or path of a patient) under ``predictions/``, if it wrote them."""
    if Path(path).is_file():
        client.log_artifact(run_id, str(path), artifact_path="predictions")


def log_plots(client: MlflowClient, run_id: str, paths: Iterable[str | Path], data_access: str) -> None:
    """Upload plot PNGs under ``plots/``; Grad-CAM overlays (patient images) only for shareable data."""
    from trainer.data.cache import SHAREABLE_ACCESS  # here: trainer.data.cache loads PyTorch (seconds)

    for p in map(Path, paths):
        if p.name.startswith("gradcam") and data_access not in SHAREABLE_ACCESS:
            continue  # patient images never leave the cluster unless public/synthetic
        if p.is_file():
            client.log_artifact(run_id, str(p), artifact_path="plots")


def search_config_tag(config: dict[str, Any]) -> dict[str, str]:
    """The searcher's draw of a trial as a tag (what warm starts and importance replay), unless too
    long for a tag value (MLflow keeps 8000 characters; a cut JSON would not parse)."""
    import json

    text = json.dumps(config, sort_keys=True, default=str)
    return {SEARCH_CONFIG_TAG: text} if len(text) <= 8000 else {}


def dataset_tags(cfg: TrialConfig) -> dict[str, str]:
    """The trial's dataset identity as tags: the cache's content hash and access level (model cards)."""
    from trainer.data.cache import read_header

    header = read_header(cfg.data.cache)
    if not header:
        return {}
    return {
        "cxr.cache_hash": str(header.get("content_hash", "")),
        "cxr.data_access": str(header.get("data_access", "")),
    }


def run_title(cfg: TrialConfig, trial_id: str = "") -> str:
    """A run name that says what the run is: ``soft λ=0.874 t=0.61 τ=0.05 [id]``, ``energy
    λ=adaptive [id]``, ``CE λ=1 [id]`` (plain cross-entropy); only the settings that take effect."""
    att = cfg.attention
    if not att.uses_attention:
        parts = ["CE", "λ=1"]
    else:
        lam = att.lambda_ if isinstance(att.lambda_, str) else f"{att.lambda_:.3g}"
        parts = [att.mode, f"λ={lam}"]
        unused = att.inactive()
        parts += [f"t={att.threshold:.3g}"] if "threshold" not in unused else []
        parts += [f"τ={att.tau:g}"] if "tau" not in unused else []
        parts += [f"layer={att.layer}"] if att.layer != "last" and "layer" not in unused else []
    return " ".join([*parts, f"[{trial_id}]"] if trial_id else parts)


class TrialRun:
    """One MLflow run for one trial; ``finish(error)`` ends it FINISHED, FAILED or KILLED."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        *,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = experiment_id(self.client, experiment, tracking_uri)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self.run = self.client.create_run(self.experiment_id, run_name=redact(run_name), tags=all_tags)
        self.run_id = self.run.info.run_id

    # -- logging ----------------------------------------------------------------------------------
    def log_config(self, cfg: TrialConfig, resolved_file: Path | None = None) -> None:
        log_params(self.client, self.run_id, cfg.flat_params())
        self.set_tags(dataset_tags(cfg))
        if resolved_file is not None and resolved_file.is_file():
            log_text_file(self.client, self.run_id, resolved_file)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step=epoch)
        if metrics.get("train_cam_zero_fraction") == 1.0:
            self.set_tags({CAM_ZERO_TAG: f"epoch {epoch}: every training CAM was all zero"})

    def log_result(self, result: dict[str, Any]) -> None:
        summary = {k: v for k, v in result.items() if k.startswith(("best_val_", "test_"))}
        summary["best_epoch"] = result.get("best_epoch", -1)
        summary["epochs_run"] = result.get("epochs_run", 0)
        log_metrics(self.client, self.run_id, summary)
        log_plots(self.client, self.run_id, result.get("artifacts", []), result.get("data_access", "private"))
        if result.get("predictions_path"):
            log_predictions(self.client, self.run_id, result["predictions_path"])
        if result.get("model_path"):
            self.set_tags({MODEL_URI_TAG: str(result["model_path"])})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    # -- lifecycle --------------------------------------------------------------------------------
    def finish(self, error: BaseException | None = None) -> None:
        if error is None:
            self.client.set_terminated(self.run_id, "FINISHED")
            return
        msg = redact(f"{type(error).__name__}: {error}")
        self.set_tags({"error": msg[:MAX_ERROR], "error_type": type(error).__name__})
        self.client.set_terminated(
            self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        )
