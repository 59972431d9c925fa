"""The driver's MLflow writer: one child run per Ray trial, written only by the driver.

Trials never talk to MLflow: they report to Ray, and this Tune callback (running in the
driver process) logs params, per-epoch metrics (``step=epoch``), summaries and artifacts.
One writer means the embedded sqlite store never sees concurrent writers ("database is
locked" cannot happen), and trials on any node need no route to the tracking server. Runs are
keyed by the Ray trial id (tag ``ray.trial_id``), so a retried trial or a resumed sweep keeps
exactly one run per trial.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from .space import SweepSpec, flatten_ray_config, overrides_from_params, trial_config_for
from .tracking import (
    MAX_ERROR,
    MODEL_URI_TAG,
    dataset_tags,
    log_metrics,
    log_params,
    log_plots,
    log_text_file,
    redact,
)
from .trainable import FINAL_KEY

__all__ = ["MlflowSweepCallback"]

_EPOCH_PREFIXES = ("train_", "val_")
_EPOCH_KEYS = ("lambda", "lr", "epoch_time_s")


class MlflowSweepCallback(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, spec: SweepSpec) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.spec = spec
        self.client = MlflowClient(tracking_uri)
        self.runs: dict[str, str] = {}  # Ray trial id → MLflow run id
        self.best: dict[str, dict[str, float]] = {}  # trial id → val metrics of its best epoch so far
        self.tagged: set[str] = set()
        self.logged_metrics = 0
        self.last_epoch: dict[str, int] = {}  # run id → last epoch logged (runs adopted on resume: lazily)
        for run in self.client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000
        ):
            tid = run.data.tags.get("ray.trial_id")
            if tid:
                self.runs[tid] = run.info.run_id

    # Ray pickles the callbacks with the experiment and `Tuner.restore` unpickles them: a restored
    # callback must read which runs exist now, not carry the mapping of when it was pickled.
    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("tracking_uri", "experiment_id", "parent_run_id", "spec")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # -- helpers --------------------------------------------------------------------------------------
    def _run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid in self.runs:
            return self.runs[tid]
        flat = flatten_ray_config(trial.config)
        run = self.client.create_run(
            self.experiment_id,
            run_name=str(trial),
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "ray.trial_id": tid,
                "cxr.kind": "trial",
                "cxr.sweep": self.spec.name,
            },
        )
        self.runs[tid] = run.info.run_id
        self.last_epoch[run.info.run_id] = -1
        # output_dir: the trial's folder in storage, where its checkpoints and best model land
        where = getattr(trial, "path", None) or trial.local_path or "."
        cfg = trial_config_for(self.spec, flat, str(trial), str(where))
        searched = {f"search.{k}": v for k, v in overrides_from_params(flat).items()}
        log_params(self.client, run.info.run_id, {**cfg.flat_params(), **searched})
        self.client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in dataset_tags(cfg).items()])
        return run.info.run_id

    def _last_epoch(self, run_id: str) -> int:
        if run_id not in self.last_epoch:
            history = self.client.get_metric_history(run_id, "train_loss")
            self.last_epoch[run_id] = max((m.step for m in history), default=-1)
        return self.last_epoch[run_id]

    def _log(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.logged_metrics += log_metrics(self.client, run_id, metrics, step)

    # -- Tune hooks -----------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self._run_id(trial)
        if result.get(FINAL_KEY):
            return  # the summary is logged at completion (tags came with the first epoch)
        tid = trial.trial_id
        if tid not in self.tagged and result.get("node_id"):
            self.client.log_batch(
                run_id,
                tags=[
                    RunTag("ray.gpu_ids", result.get("gpu_ids", "")),
                    RunTag("ray.node_id", result["node_id"]),
                ],
            )
            self.tagged.add(tid)
        metrics = {
            k: v
            for k, v in result.items()
            if (k.startswith(_EPOCH_PREFIXES) or k in _EPOCH_KEYS) and isinstance(v, int | float)
        }
        epoch = int(result.get("epoch", result.get("epochs_done", 1) - 1))
        if epoch > self._last_epoch(run_id):  # after a driver crash Ray may re-run logged epochs
            self._log(run_id, metrics, epoch)
            self.last_epoch[run_id] = epoch
        score = metrics.get(self.spec.metric)
        prev = self.best.get(tid, {}).get(self.spec.metric)
        sign = 1 if self.spec.mode == "max" else -1
        if score is not None and (prev is None or sign * score > sign * prev):
            self.best[tid] = {
                **{k: v for k, v in metrics.items() if k.startswith("val_")},
                "epoch": result["epoch"],
            }

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self._run_id(trial)
        if self.client.get_run(run_id).info.status == "FINISHED":
            return  # a finished trial that Ray restored after a driver crash: its run is complete
        last = trial.last_result or {}
        if last.get(FINAL_KEY):
            summary = {k: v for k, v in last.items() if k.startswith(("best_val_", "test_"))}
            summary.update(best_epoch=last.get("best_epoch", -1), epochs_run=last.get("epochs_run", 0))
            self._log(run_id, summary, 0)
            self._upload(run_id, trial, str(last.get("data_access", "private")))
            if trial.checkpoint is not None:  # the final checkpoint holds model.pt (best epoch)
                self.client.set_tag(run_id, MODEL_URI_TAG, _checkpoint_file(trial.checkpoint, "model.pt"))
        else:  # stopped early by the scheduler: no test evaluation
            best = self.best.get(trial.trial_id, {})
            summary = {f"best_{k}": v for k, v in best.items() if k.startswith("val_")}
            summary["best_epoch"] = best.get("epoch", -1)
            self._log(run_id, summary, 0)
            self.client.set_tag(run_id, "cxr.stopped_early", "true")
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self._run_id(trial)
        msg = redact(_error_text(trial))
        self.client.log_batch(
            run_id, tags=[RunTag("error", msg[-MAX_ERROR:]), RunTag("error_type", _error_type(msg))]
        )
        self.client.set_terminated(run_id, "FAILED")

    def _upload(self, run_id: str, trial, data_access: str) -> None:
        ckpt = trial.checkpoint
        if ckpt is None:
            return
        try:
            local = Path(ckpt.to_directory())
        except Exception:  # storage unreachable from the driver: keep the run, skip the files
            self.client.set_tag(run_id, "cxr.artifacts", "unavailable")
            return
        config = local / "config.resolved.yaml"
        if config.is_file():
            log_text_file(self.client, run_id, config)
        log_plots(self.client, run_id, sorted((local / "plots").glob("*.png")), data_access)


def _checkpoint_file(ckpt, name: str) -> str:
    """A file in a Ray checkpoint as a local path, or ``<fs>://...`` on remote storage (e.g. s3://)."""
    path = f"{ckpt.path.rstrip('/')}/{name}"
    kind = getattr(ckpt.filesystem, "type_name", "local")
    return path if kind == "local" else f"{kind}://{path}"


def _error_text(trial) -> str:
    for attr in ("error_file", "pickled_error_file"):
        path = getattr(trial, attr, None)
        if path and Path(path).is_file() and attr == "error_file":
            return Path(path).read_text(errors="replace").strip()
    return str(getattr(trial, "error_msg", None) or "trial failed (no error text recorded)")


def _error_type(msg: str) -> str:
    last = [line for line in msg.strip().splitlines() if line.strip()]
    head = last[-1].split(":", 1)[0].strip() if last else "Error"
    return head.rsplit(".", 1)[-1][:200]
