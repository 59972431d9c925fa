"""The driver's MLflow writer: one child run per Ray trial, written only by the driver.

Trials never talk to MLflow: they report to Ray, and this Tune callback (running in the
driver process) logs params, per-epoch metrics (``step=epoch``), summaries and artifacts.
One writer means the embedded sqlite store never sees concurrent writers ("database is
locked" cannot happen), and trials on any node need no route to the tracking server. Runs are
keyed by the Ray trial id (tag ``ray.trial_id``), so a retried trial or a resumed sweep keeps
exactly one run per trial.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from ..reports import unpack
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
    log_steps,
    log_text_file,
    redact,
    run_title,
    search_config_tag,
)
from .writer import TrackingWriter, writers_for

__all__ = ["FLUSH_GRACE_S", "MlflowSweepCallback", "TrackingUnavailable"]

FLUSH_GRACE_S = float(os.environ.get("CXR_TRACKING_GRACE_S", "120"))  # wait at the end for a lost store


class TrackingUnavailable(RuntimeError):
    """The tracking store did not come back before the sweep ended: names the trials affected."""


_EPOCH_PREFIXES = ("train_", "val_")
_EPOCH_KEYS = ("lambda", "lr", "epoch_time_s", "epoch_train_s", "epoch_val_s")


class MlflowSweepCallback(Callback):
    # called with (trial, results) once a trial's epoch results are in the store (benchmarks time it)
    after_log = None
    end_grace_s: float | None = None  # the end's wait for a lost store, if shorter than FLUSH_GRACE_S

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, spec: SweepSpec) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.spec = spec
        self.client = MlflowClient(tracking_uri)
        self.runs: dict[str, str] = {}  # Ray trial id → MLflow run id
        self.tagged: set[str] = set()
        self.logged_metrics = 0
        self._count = threading.Lock()  # writer threads add to logged_metrics
        self.last_epoch: dict[str, int] = {}  # run id → last epoch logged (runs adopted on resume: lazily)
        self.described: set[str] = set()  # trial ids whose run has its params
        self.interrupted: set[str] = set()  # trial ids whose run ended KILLED when the sweep was interrupted
        # trial ids whose hook met an unreachable store before their run was known: a create_run whose
        # response was lost may have made the run, so the replay looks it up before creating one
        self.unsure: set[str] = set()
        # the writer reports a store it cannot write to in one line (and queues the write); MLflow's
        # own logger would print every failed SQL statement with its traceback (a full disk: dozens)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
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
        self._fetching = threading.Lock()
        if spec.repeats > 1:
            configs = set(self.runs.values())
            for run in self.client.search_runs(
                [experiment_id], filter_string="tags.`cxr.kind` = 'seed'", max_results=50000
            ):
                tags = run.data.tags
                if tags.get("mlflow.parentRunId") in configs and "cxr.seed_index" in tags:
                    self.seed_runs[(tags["ray.trial_id"], int(tags["cxr.seed_index"]))] = run.info.run_id
        # the hooks run on writer threads, off Tune's event loop (sweeps.tracking.writer)
        self.writer = TrackingWriter(self._run_hook, writers_for(tracking_uri), self._forget_last_epoch)

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
        if tid in self.unsure and (found := self._created_before(tid)) is not None:
            self.runs[tid] = found
            return self._describe(trial, found)  # params again: the same values, accepted
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
        run_id = self._created_before(trial.trial_id, parent, i) if trial.trial_id in self.unsure else None
        if run_id is None:
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
            self.last_epoch[run_id] = -1
        # (a run made before a lost response gets its params and tags again: the same values, accepted)
        log_params(self.client, run_id, {**cfg.flat_params(), "train.seed": str(seed)})
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in dataset_tags(cfg).items()])
        self.seed_runs[key] = run_id
        self.seeds_seen.add(run_id)
        return run_id

    def _created_before(self, tid: str, parent: str | None = None, seed: int | None = None) -> str | None:
        """The run of trial ``tid`` (or of its seed ``seed`` under ``parent``) if the store has one."""
        where = (
            f"tags.`ray.trial_id` = '{tid}' and tags.mlflow.parentRunId = '{parent or self.parent_run_id}'"
        )
        if seed is not None:
            where += f" and tags.`cxr.seed_index` = '{seed}'"
        found = self.client.search_runs([self.experiment_id], filter_string=where, max_results=2)
        return found[0].info.run_id if found else None

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
        n = len(finite_metrics(metrics)) if stored else log_metrics(self.client, run_id, metrics, step)
        with self._count:
            self.logged_metrics += n

    # -- Tune hooks: handed to the writer, which runs them in order per trial --------------------------
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.writer.submit("_trial_start", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.writer.submit("_trial_result", trial, unpack(result))  # every value the trial reported

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.writer.submit("_trial_complete", trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.writer.submit("_trial_error", trial)

    def on_experiment_end(self, trials, **info) -> None:
        """Every update logged; a lost store gets up to ``FLUSH_GRACE_S`` (less if the driver set
        ``end_grace_s``: the storage filled up), then says what is missing."""
        grace = FLUSH_GRACE_S if self.end_grace_s is None else min(self.end_grace_s, FLUSH_GRACE_S)
        try:
            self.drain(grace)
        finally:
            self.writer.close()

    def get_state(self) -> None:
        """Tune calls this while it saves the experiment state, before that state goes to storage:
        the writer catches up first, so the state a resumed sweep restores is never ahead of what
        MLflow holds (a trial Ray saved as finished has its finished run; an epoch it saved, its
        metrics). Queued updates of an unreachable store do not hold it up; nothing to save."""
        self.writer.drain(0.0)

    def drain(self, grace_s: float = 0.0) -> None:
        """Wait for the writer: every hook run, the queued ones retried up to ``grace_s`` (the driver
        calls it on an interruption or failure too, before it ends the runs still open)."""
        left = self.writer.drain(grace_s)
        if left:
            names = sorted({str(trial) for _, trial, _ in left})
            raise TrackingUnavailable(
                f"the MLflow tracking store {self.tracking_uri} stayed unreachable: "
                f"{len(left)} update(s) of {len(names)} trial(s) were not logged: "
                f"{', '.join(names)}. The trials themselves finished; their checkpoints and results "
                "are in the sweep's storage folder."
            )

    def _run_hook(self, name: str, trial, args: tuple) -> None:
        getattr(self, name)(trial, *args)

    def _forget_last_epoch(self, trial) -> None:
        """A request that failed on the way back may have been stored: the replay re-reads the run's
        last logged epoch from the store instead of trusting this cache (no epoch logged twice), and
        looks a run up before creating it (a create_run may have landed: :attr:`unsure`)."""
        tid = getattr(trial, "trial_id", None)
        run_id = self.runs.get(tid)
        if run_id is not None:
            self.last_epoch.pop(run_id, None)
        if tid is not None:
            self.unsure.add(tid)
        for (tid, _), seed_run in list(self.seed_runs.items()):
            if tid == getattr(trial, "trial_id", None):
                self.last_epoch.pop(seed_run, None)

    # -- the hooks' work --------------------------------------------------------------------------------
    def _trial_start(self, trial) -> None:
        self._run_id(trial)

    def _trial_result(self, trial, result: dict) -> None:
        self._trial_results(trial, [result])

    def _trial_results(self, trial, results: list[dict]) -> None:
        """Epoch results of one trial (several when the writer coalesced them), each run's in one
        request: the seeds' runs first, so a configuration run that holds epoch e says its seeds'
        runs do too. Final reports are logged at completion (tags came with the first epoch)."""
        run_id = self._run_id(trial)
        tid = trial.trial_id
        seed_rows: dict[str, list[tuple[dict, int]]] = {}
        rows: list[tuple[dict, int]] = []
        for result in results:
            if result.get(FINAL_KEY):
                continue
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
            for i, seed_result in enumerate(result.get("seeds") or []):
                if int(seed_result.get("epoch", epoch)) == epoch:  # a seed that stopped early logs no more
                    seed_rows.setdefault(self._seed_run(trial, i), []).append((seed_result, epoch))
            rows.append((result, epoch))
        for seed_run, its_rows in seed_rows.items():
            self._log_epochs(seed_run, its_rows)
        if rows:
            self._log_epochs(run_id, rows)
            if self.after_log is not None:
                self.after_log(trial, [r for r, _ in rows])

    def _log_epochs(self, run_id: str, rows: list[tuple[dict, int]]) -> None:
        """Per-epoch metrics of ``rows`` in one request. After a driver crash Ray may re-run logged
        epochs, and a replay may find its epochs stored: an epoch at or before the last one stored
        is counted, not logged again."""
        last = self._last_epoch(run_id)
        fresh: list[tuple[dict, int]] = []
        stored = 0
        for result, epoch in rows:
            metrics = {
                k: v
                for k, v in result.items()
                if (k.startswith(_EPOCH_PREFIXES) or k in _EPOCH_KEYS) and isinstance(v, int | float)
            }
            if epoch <= last:
                stored += len(finite_metrics(metrics))
            else:
                fresh.append((metrics, epoch))
                last = epoch
        n = stored + log_steps(self.client, run_id, fresh)
        with self._count:
            self.logged_metrics += n
        self.last_epoch[run_id] = last
        for result, epoch in rows:
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
        last = unpack(trial.last_result or {})
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
        with self._fetching:  # writer threads: one fetch at a time, one kept
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
