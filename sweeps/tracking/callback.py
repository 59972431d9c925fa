"""The driver's MLflow writer: one child run per Ray trial, written only by the driver.

Trials never talk to MLflow: they report to Ray, and this Tune callback (running in the
driver process) logs params, per-epoch metrics (``step=epoch``), summaries and artifacts.
One writer means the embedded sqlite store never sees concurrent writers ("database is
locked" cannot happen), and trials on any node need no route to the tracking server. Runs are
keyed by the Ray trial id (tag ``ray.trial_id``), so a retried trial or a resumed sweep keeps
exactly one run per trial.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from ..space import FINAL_KEY, SweepSpec, searched_values, trial_config_for
from .parent import INTERRUPTED_TAG
from .runs import (
    CAM_ZERO_TAG,
    MAX_ERROR,
    MODEL_URI_TAG,
    PREDICTIONS_FILE,
    dataset_tags,
    finite_metrics,
    log_metrics,
    log_params,
    log_plots,
    log_predictions,
    log_text_file,
    redact,
    run_title,
    search_config_tag,
)

__all__ = ["FLUSH_GRACE_S", "MlflowSweepCallback", "TrackingUnavailable"]

FLUSH_GRACE_S = float(os.environ.get("CXR_TRACKING_GRACE_S", "120"))  # wait at the end for a lost store


class TrackingUnavailable(RuntimeError):
    """The tracking store did not come back before the sweep ended: names the trials affected."""


def _store_unreachable(e: Exception) -> bool:
    """Connection-level failures of the tracking store (retry later), not bad requests (raise)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, requests.RequestException | ConnectionError | TimeoutError):
        return True
    if isinstance(e, MlflowException):
        text = str(e)
        return "API request to" in text or "Max retries" in text or e.get_http_status_code() >= 500
    return type(e).__name__ == "OperationalError"  # sqlalchemy: the database is gone or locked


_EPOCH_PREFIXES = ("train_", "val_")
_EPOCH_KEYS = ("lambda", "lr", "epoch_time_s", "epoch_train_s", "epoch_val_s")


class MlflowSweepCallback(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, spec: SweepSpec) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.spec = spec
        self.client = MlflowClient(tracking_uri)
        self.runs: dict[str, str] = {}  # Ray trial id → MLflow run id
        self.tagged: set[str] = set()
        self.logged_metrics = 0
        self.last_epoch: dict[str, int] = {}  # run id → last epoch logged (runs adopted on resume: lazily)
        self.described: set[str] = set()  # trial ids whose run has its params
        self.pending: list[tuple[str, Any, tuple]] = []  # hooks that met an unreachable store, in order
        self.unreachable_since: float | None = None
        self.interrupted: set[str] = set()  # trial ids whose run ended KILLED when the sweep was interrupted
        # fail fast inside a hook (its work is queued and replayed) instead of MLflow's minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        for run in self.client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000
        ):
            tid = run.data.tags.get("ray.trial_id")
            if tid:
                self.runs[tid] = run.info.run_id
                self.described.add(tid)
                if run.info.status == "KILLED" and INTERRUPTED_TAG in run.data.tags:
                    self.interrupted.add(tid)
        self.seed_runs: dict[tuple[str, int], str] = {}  # (Ray trial id, seed index) → MLflow run id
        self.seeds_seen: set[str] = set()  # seed runs of an earlier driver checked for an interruption
        self.fetched: dict[str, str] = {}  # the last final checkpoint fetched → its local folder
        if spec.repeats > 1:
            configs = set(self.runs.values())
            for run in self.client.search_runs(
                [experiment_id], filter_string="tags.`cxr.kind` = 'seed'", max_results=50000
            ):
                tags = run.data.tags
                if tags.get("mlflow.parentRunId") in configs and "cxr.seed_index" in tags:
                    self.seed_runs[(tags["ray.trial_id"], int(tags["cxr.seed_index"]))] = run.info.run_id

    # Ray pickles the callbacks with the experiment and `Tuner.restore` unpickles them: a restored
    # callback must read which runs exist now, not carry the mapping of when it was pickled.
    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("tracking_uri", "experiment_id", "parent_run_id", "spec")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # -- helpers --------------------------------------------------------------------------------------
    def _run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid in self.interrupted:  # the resumed sweep runs it again: so does its MLflow run
            self.client.update_run(self.runs[tid], status="RUNNING")
            self.client.delete_tag(self.runs[tid], INTERRUPTED_TAG)
            self.interrupted.discard(tid)
        if tid in self.runs:
            if tid in self.described:
                return self.runs[tid]
            return self._describe(trial, self.runs[tid])  # a replay after a failure mid-way
        cfg = self._trial_config(trial)
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_title(cfg, tid),
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "ray.trial_id": tid,
                "cxr.kind": "trial",
                "cxr.sweep": self.spec.name,
                **({"cxr.repeats": str(self.spec.repeats)} if self.spec.repeats > 1 else {}),
            },
        )
        self.runs[tid] = run.info.run_id
        self.last_epoch[run.info.run_id] = -1
        return self._describe(trial, run.info.run_id, cfg)

    def _seed_run(self, trial, i: int) -> str:
        """The nested run of seed ``i`` of a repeated trial (created with its params on first use)."""
        key = (trial.trial_id, i)
        if key in self.seed_runs:
            run_id = self.seed_runs[key]
            if run_id not in self.seeds_seen:  # the resumed sweep runs it again: so does its run
                run = self.client.get_run(run_id)
                if run.info.status == "KILLED" and INTERRUPTED_TAG in run.data.tags:
                    self.client.update_run(run_id, status="RUNNING")
                    self.client.delete_tag(run_id, INTERRUPTED_TAG)
                self.seeds_seen.add(run_id)
            return run_id
        parent = self._run_id(trial)
        cfg = self._trial_config(trial)
        seed = cfg.train.seed + i
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{run_title(cfg)} seed {seed} [{trial.trial_id}]",
            tags={
                "mlflow.parentRunId": parent,
                "ray.trial_id": trial.trial_id,
                "cxr.kind": "seed",
                "cxr.sweep": self.spec.name,
                "cxr.seed_index": str(i),
            },
        )
        run_id = run.info.run_id
        log_params(self.client, run_id, {**cfg.flat_params(), "train.seed": str(seed)})
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in dataset_tags(cfg).items()])
        self.seed_runs[key] = run_id
        self.seeds_seen.add(run_id)
        self.last_epoch[run_id] = -1
        return run_id

    def _trial_config(self, trial):
        # output_dir: the trial's folder in storage, where its checkpoints and best model land
        where = getattr(trial, "path", None) or trial.local_path or "."
        return trial_config_for(self.spec, trial.config, str(trial), str(where))

    def _describe(self, trial, run_id: str, cfg=None) -> str:
        """Params and dataset tags of a new trial run: only settings that take effect in it, so a
        fixed-λ or energy-mode run shows no threshold, slope or τ it never used."""
        cfg = cfg or self._trial_config(trial)
        searched = {f"search.{k}": v for k, v in searched_values(self.spec, trial.config).items()}
        log_params(self.client, run_id, {**cfg.flat_params(), **searched})
        tags = {**dataset_tags(cfg), **search_config_tag(trial.config)}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.described.add(trial.trial_id)
        return run_id

    def _last_epoch(self, run_id: str) -> int:
        if run_id not in self.last_epoch:
            history = self.client.get_metric_history(run_id, "train_loss")
            self.last_epoch[run_id] = max((m.step for m in history), default=-1)
        return self.last_epoch[run_id]

    def _log(self, run_id: str, metrics: dict[str, float], step: int, *, stored: bool = False) -> None:
        """Log ``metrics`` unless ``stored`` (a replayed write that had landed before the store went
        away); either way they count in ``logged_metrics``: this sweep's values that are in the store."""
        if stored:
            self.logged_metrics += len(finite_metrics(metrics))
        else:
            self.logged_metrics += log_metrics(self.client, run_id, metrics, step)

    # -- Tune hooks -----------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._guarded(self._trial_start, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._guarded(self._trial_result, trial, dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._guarded(self._trial_complete, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._guarded(self._trial_error, trial)

    def on_experiment_end(self, trials, **info) -> None:
        """Last chance for queued updates: retry for up to ``FLUSH_GRACE_S``, then say what is missing."""
        deadline = time.monotonic() + FLUSH_GRACE_S
        while self.pending and time.monotonic() < deadline:
            time.sleep(2.0)
            self._flush()
        if self.pending:
            names = sorted({str(trial) for _, trial, _ in self.pending})
            raise TrackingUnavailable(
                f"the MLflow tracking store {self.tracking_uri} stayed unreachable: "
                f"{len(self.pending)} update(s) of {len(names)} trial(s) were not logged: "
                f"{', '.join(names)}. The trials themselves finished; their checkpoints and results "
                "are in the sweep's storage folder."
            )

    # -- an unreachable store: queue, replay in order once it answers ---------------------------------
    def _guarded(self, hook, trial, *args) -> None:
        self._flush()
        if self.pending:  # still down: keep the order
            self.pending.append((hook.__name__, trial, args))
            return
        try:
            hook(trial, *args)
        except Exception as e:
            if not _store_unreachable(e):
                raise
            self._queue(hook.__name__, trial, args, e)

    def _queue(self, name: str, trial, args: tuple, error: Exception) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
            print(f"MLflow tracking store unreachable ({type(error).__name__}): trials go on, updates queue")
        self._forget_last_epoch(trial)
        self.pending.append((name, trial, args))

    def _forget_last_epoch(self, trial) -> None:
        """A request that failed on the way back may have been stored: the replay re-reads the run's
        last logged epoch from the store instead of trusting this cache (no epoch logged twice)."""
        run_id = self.runs.get(getattr(trial, "trial_id", None))
        if run_id is not None:
            self.last_epoch.pop(run_id, None)

    def _flush(self) -> None:
        while self.pending:
            name, trial, args = self.pending[0]
            try:
                getattr(self, name)(trial, *args)
            except Exception as e:
                if not _store_unreachable(e):
                    raise
                self._forget_last_epoch(trial)
                return
            self.pending.pop(0)
        if self.unreachable_since is not None:
            down = time.monotonic() - self.unreachable_since
            print(f"MLflow tracking store back after {down:.0f} s: queued updates logged")
            self.unreachable_since = None

    # -- the hooks' work --------------------------------------------------------------------------------
    def _trial_start(self, trial) -> None:
        self._run_id(trial)

    def _trial_result(self, trial, result: dict) -> None:
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
        epoch = int(result.get("epoch", result.get("epochs_done", 1) - 1))
        # seeds first: a configuration run that holds epoch e says its seeds' runs do too
        for i, seed_result in enumerate(result.get("seeds") or []):
            if int(seed_result.get("epoch", epoch)) == epoch:  # a seed that stopped early logs no more
                self._log_epoch(self._seed_run(trial, i), seed_result, epoch)
        self._log_epoch(run_id, result, epoch)

    def _log_epoch(self, run_id: str, result: dict, epoch: int) -> None:
        metrics = {
            k: v
            for k, v in result.items()
            if (k.startswith(_EPOCH_PREFIXES) or k in _EPOCH_KEYS) and isinstance(v, int | float)
        }
        # after a driver crash Ray may re-run logged epochs; a replay may find its epoch stored
        self._log(run_id, metrics, epoch, stored=epoch <= self._last_epoch(run_id))
        self.last_epoch[run_id] = max(epoch, self._last_epoch(run_id))
        if result.get("train_cam_zero_fraction") == 1.0:
            self.client.set_tag(run_id, CAM_ZERO_TAG, f"epoch {epoch}: every training CAM was all zero")

    def _trial_complete(self, trial) -> None:
        run_id = self._run_id(trial)
        run = self.client.get_run(run_id)
        if run.info.status == "FINISHED":
            return  # a finished trial that Ray restored after a driver crash: its run is complete
        # a replay after the store went away mid-request: the summary may be stored already (one batch,
        # all or nothing); logging it again would double every value in the run's history
        stored = "best_epoch" in run.data.metrics
        last = trial.last_result or {}
        seeds = last.get("seeds") or []
        for i, seed_result in enumerate(seeds):  # seeds first: their configuration's run ends last
            seed_run = self._seed_run(trial, i)
            self._complete(seed_run, trial, seed_result, bool(last.get(FINAL_KEY)), f"seed_{i}/")
        if seeds:
            tags = {"cxr.repeats": str(len(seeds))}
            if last.get(FINAL_KEY):
                best = int(last.get("best_seed", 0))
                tags |= {"cxr.best_seed": str(seeds[best].get("seed", best))}
                tags |= {"cxr.best_seed_run": self._seed_run(trial, best)}
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._complete(run_id, trial, last, bool(last.get(FINAL_KEY)), "", stored=stored)

    def _complete(self, run_id: str, trial, last: dict, final: bool, folder: str, stored=None) -> None:
        """Summary, files and status of a finished run (a trial's, or one seed's from ``folder``)."""
        if stored is None:
            run = self.client.get_run(run_id)
            if run.info.status == "FINISHED":
                return
            stored = "best_epoch" in run.data.metrics
        repeated = "seeds" in last
        if final:
            summary = {k: v for k, v in last.items() if k.startswith(("best_val_", "test_"))}
            summary.update(best_epoch=last.get("best_epoch", -1), epochs_run=last.get("epochs_run", 0))
            self._log(run_id, summary, 0, stored=stored)
            self._upload(run_id, trial, str(last.get("data_access", "private")), folder, files=not repeated)
            if trial.checkpoint is not None:  # the final checkpoint holds model.pt (best epoch)
                best = f"seed_{int(last.get('best_seed', 0))}/" if repeated else folder
                self.client.set_tag(
                    run_id, MODEL_URI_TAG, _checkpoint_file(trial.checkpoint, f"{best}model.pt")
                )
        else:  # stopped early by the scheduler: no test evaluation; its best epoch so far, as it chose it
            summary = {k: v for k, v in last.items() if k.startswith("best_val_")}
            summary["best_epoch"] = last.get("best_epoch", -1)
            self._log(run_id, summary, 0, stored=stored)
            self.client.set_tag(run_id, "cxr.stopped_early", "true")
        self.client.set_terminated(run_id, "FINISHED")

    def _trial_error(self, trial) -> None:
        run_id = self._run_id(trial)
        msg = redact(_error_text(trial))
        tags = [RunTag("error", msg[-MAX_ERROR:]), RunTag("error_type", _error_type(msg))]
        for (tid, _), seed_run in self.seed_runs.items():
            if tid == trial.trial_id and self.client.get_run(seed_run).info.status == "RUNNING":
                self.client.log_batch(seed_run, tags=tags)
                self.client.set_terminated(seed_run, "FAILED")
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, "FAILED")

    def _upload(self, run_id: str, trial, data_access: str, folder: str = "", files: bool = True) -> None:
        """The resolved config, and (``files``) predictions and plots, from the final checkpoint's
        ``folder`` (a seed's ``seed_<i>/``; a repeated configuration's run gets the config only)."""
        ckpt = trial.checkpoint
        if ckpt is None:
            return
        try:
            local = Path(self._local_checkpoint(ckpt)) / folder
        except Exception:  # storage unreachable from the driver: keep the run, skip the files
            self.client.set_tag(run_id, "cxr.artifacts", "unavailable")
            return
        config = local / "config.resolved.yaml"
        if config.is_file():
            log_text_file(self.client, run_id, config)
        if files:
            log_predictions(self.client, run_id, local / PREDICTIONS_FILE)
            log_plots(self.client, run_id, sorted((local / "plots").glob("*.png")), data_access)

    def _local_checkpoint(self, ckpt) -> str:
        """A local copy of ``ckpt`` (its own folder on local storage), fetched once per checkpoint."""
        if ckpt.path not in self.fetched:
            self.fetched = {ckpt.path: ckpt.to_directory()}
        return self.fetched[ckpt.path]


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
