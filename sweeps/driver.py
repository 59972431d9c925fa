"""The sweep driver: a search-space YAML → Ray Tune (OptunaSearch / random / grid, ASHA) → MLflow.

``run_sweep(path)`` validates everything before any trial starts (sweep file, every searched
value against the trial config, the dataset cache, the Ray address, the tracking server), opens
one MLflow parent run, and runs the Tuner with retries from checkpoints. ``resume_sweep(name)``
continues an interrupted sweep (``Tuner.restore``) without re-running finished trials.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainer.config import ConfigError
from trainer.data.cache import open_cache

from .space import SweepSpec, load_sweep, optuna_space, ray_param_space
from .tracking import default_tracking_uri

__all__ = [
    "SPEC_FILE",
    "SweepOutcome",
    "check_ray_address",
    "check_shared_storage",
    "check_storage",
    "check_tracking",
    "resume_sweep",
    "run_sweep",
    "sweep_dir",
    "sweep_rows",
]

SPEC_FILE = "cxr_sweep.json"  # the resolved sweep, saved beside Ray's experiment state


@dataclass
class SweepOutcome:
    name: str
    path: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    metrics_logged: int


def sweep_dir(spec: SweepSpec) -> str:
    return f"{spec.storage_path.rstrip('/')}/{spec.name}"


# ---- checks that run before any trial ---------------------------------------------------------------
def resolve_sweep_tracking_uri(spec: SweepSpec) -> str:
    if spec.mlflow.tracking_uri:
        return spec.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in spec.storage_path:
        raise ConfigError(
            "mlflow.tracking_uri: required when storage_path is remote (set it or MLFLOW_TRACKING_URI)"
        )
    Path(spec.storage_path).mkdir(parents=True, exist_ok=True)
    return default_tracking_uri(spec.storage_path)


MIN_FREE_STORAGE_MB = 100  # checkpoints, Ray's experiment state and the embedded MLflow store


def check_storage(spec: SweepSpec) -> None:
    """A local ``storage_path`` must be creatable, writable and not (nearly) full, before any trial."""
    if "://" in spec.storage_path:
        return
    path = Path(spec.storage_path)
    probe = path / f".cxr-write-check-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"storage_path: {path} is not writable: {e.strerror or e}") from None
    finally:
        probe.unlink(missing_ok=True)
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < MIN_FREE_STORAGE_MB:
        raise ConfigError(
            f"storage_path: {path} has {free_mb:.1f} MiB free; a sweep needs at least "
            f"{MIN_FREE_STORAGE_MB} MiB for checkpoints, Ray's experiment state and the MLflow store"
        )


def check_tracking(uri: str) -> None:
    """Fail fast (seconds, no retry storm) when the tracking store cannot be reached or refuses us.

    A served store (``http(s)://``) is probed once, without MLflow's minutes of retries, with the
    credentials the MLflow client would send; a database URI (``postgresql://``...) gets one
    connection attempt. File and sqlite stores need no check.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_tracking_server(uri)
    elif scheme.split("+")[0] in ("postgresql", "postgres", "mysql", "mssql"):
        _check_tracking_database(uri)


_CREDENTIAL_VARS = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"


def _check_tracking_server(uri: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        resp = http_request(
            creds,
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=0,
            backoff_factor=0,
            timeout=10,
            raise_on_status=False,
            params={"max_results": 1},
        )
    except MlflowException as e:  # connection refused, DNS, TLS, timeout
        raise ConfigError(f"mlflow.tracking_uri: tracking server {uri} is unreachable: {e.message}") from None
    who = f"user {creds.username!r}" if creds.username else ("a token" if creds.token else None)
    if resp.status_code == 401:
        if who is None:
            raise ConfigError(
                f"mlflow.tracking_uri: {uri} requires a login (HTTP 401) and no credentials are set: "
                f"export {_CREDENTIAL_VARS}"
            )
        raise ConfigError(
            f"mlflow.tracking_uri: {uri} refused the credentials of {who} (HTTP 401): "
            f"check {_CREDENTIAL_VARS}"
        )
    if resp.status_code == 403:
        raise ConfigError(
            f"mlflow.tracking_uri: {uri} denies {who or 'anonymous access'} (HTTP 403): ask its admin for "
            f"permission, or use other credentials ({_CREDENTIAL_VARS})"
        )
    if resp.status_code >= 500:
        raise ConfigError(
            f"mlflow.tracking_uri: tracking server {uri} is up but failing (HTTP {resp.status_code}: "
            f"{_server_message(resp)}); its backend store (PostgreSQL) may be down: see the server's log"
        )
    if resp.status_code != 200:
        raise ConfigError(
            f"mlflow.tracking_uri: {uri} answered HTTP {resp.status_code} ({_server_message(resp)}): "
            "is this an MLflow tracking server?"
        )


def _server_message(resp) -> str:
    try:
        return str(resp.json().get("message", ""))[:300] or resp.reason
    except ValueError:
        return (resp.text or resp.reason or "").strip().splitlines()[0][:300] if resp.text else resp.reason


def _check_tracking_database(uri: str) -> None:
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
        args = {"connect_timeout": 5} if url.get_backend_name() == "postgresql" else {}
        engine = sqlalchemy.create_engine(url, connect_args=args)
    except (sqlalchemy.exc.ArgumentError, ImportError) as e:
        raise ConfigError(f"mlflow.tracking_uri: unusable database URI {uri!r}: {e}") from None
    shown = url.render_as_string(hide_password=True)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as e:
        first = str(e.orig or e).strip().splitlines()[0]
        raise ConfigError(
            f"mlflow.tracking_uri: database {shown} is not accepting connections ({first}): "
            "is PostgreSQL running and are host, port, user and password right?"
        ) from None
    finally:
        engine.dispose()


def check_ray_address(address: str | None) -> None:
    """A quick TCP probe of ``host:port`` / ``ray://host:port`` so a wrong address fails in seconds."""
    if address in (None, "", "auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as e:
        raise ConfigError(f"--address: Ray cluster at {address} is unreachable: {e}") from None


_PROBE_TIMEOUT_S = 60


def check_shared_storage(spec: SweepSpec) -> None:
    """On a cluster, prove every node that can run a trial sees ``storage_path`` as the driver does.

    The driver writes a random token under ``storage_path``; a zero-CPU task pinned to each node
    reads it back and writes a reply the driver must then see. A node-local directory fails this
    (the node finds no token, or another one): its trials' checkpoints would never reach the driver
    and a trial moved off a failed node could not resume. Cloud URIs (``s3://``) need no check.
    """
    import ray

    if "://" in spec.storage_path:
        return
    need_cpu, need_gpu = spec.resources.cpu, spec.resources.gpu
    nodes = [
        n
        for n in ray.nodes()
        if n.get("Alive")
        and n["Resources"].get("CPU", 0) >= need_cpu
        and n["Resources"].get("GPU", 0) >= need_gpu
    ]
    if len(nodes) < 2 and all(n["NodeManagerAddress"] == _driver_ip() for n in nodes):
        return  # one node, the driver's own machine: nothing to share
    import secrets

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    probe_dir = Path(spec.storage_path).resolve() / f".cxr-storage-check-{token}"
    try:
        probe_dir.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"storage_path: cannot create {probe_dir}: {e.strerror or e}") from None
    try:
        (probe_dir / "token").write_text(token)
        probe = ray.remote(num_cpus=0, max_retries=0)(_storage_probe)
        refs = {
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(probe_dir), token
            ): n
            for n in nodes
        }
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=_PROBE_TIMEOUT_S)
        problems = []
        for ref in ready:
            node, error = refs[ref], ray.get(ref)
            if not error and not (probe_dir / f"seen-{node['NodeID']}").is_file():
                error = "its writes there do not appear on the driver's side"
            if error:
                problems.append(f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]}): {error}")
        unchecked = [refs[r]["NodeManagerAddress"] for r in refs if r not in ready]
        if unchecked:
            import warnings

            warnings.warn(
                f"storage_path check: node(s) {', '.join(unchecked)} did not answer within "
                f"{_PROBE_TIMEOUT_S} s; their view of {spec.storage_path} is unverified",
                stacklevel=2,
            )
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if problems:
        raise ConfigError(
            f"storage_path: {spec.storage_path} is not shared across the cluster's nodes: these nodes do "
            f"not see the directory the driver (on {_driver_ip()}) wrote to: " + "; ".join(problems) + ". "
            "Every node that runs trials must see the same directory at the same path (an NFS/CephFS "
            "mount, or one volume mounted at that path in every pod), or use s3://bucket/prefix. "
            "Otherwise trials write checkpoints and results the driver never sees, and a trial moved "
            "off a failed node cannot resume (docs/cluster.md, 'Shared storage')."
        )


def _storage_probe(probe_dir: str, token: str) -> str:
    """Runs on one node: '' when it reads the driver's token and can reply, else what went wrong."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    path = Path(probe_dir)
    try:
        seen = (path / "token").read_text()
    except OSError as e:
        return f"cannot read {path / 'token'} ({e.strerror or e})"
    if seen != token:
        return f"{path} holds another token: a different directory under the same name"
    try:
        (path / f"seen-{node}").write_text(token)
    except OSError as e:
        return f"cannot write in {path} ({e.strerror or e})"
    return ""


def _driver_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _check_cache(spec: SweepSpec) -> None:
    from trainer.tasks import classes_for

    trial = spec.trial
    open_cache(trial["data"]["cache"], classes=classes_for(trial["data"]["task"]), verify=False)


# ---- MLflow parent run ------------------------------------------------------------------------------
def _parent_run(uri: str, spec: SweepSpec, space_file: str | None, restore: bool) -> tuple[str, str]:
    """The sweep's parent run: a new one, or (resume) the one the sweep started with."""
    from mlflow.tracking import MlflowClient

    from .tracking import experiment_id

    client = MlflowClient(uri)
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


def _open_parent_run(uri: str, spec: SweepSpec, space_file: str | None, restore: bool) -> tuple[str, str]:
    """:func:`_parent_run`, with a refused write (a read-only user) as a clear error."""
    from mlflow.exceptions import MlflowException

    try:
        return _parent_run(uri, spec, space_file, restore)
    except MlflowException as e:
        if e.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise ConfigError(
                f"mlflow.tracking_uri: {uri} refused to record the sweep in experiment "
                f"{spec.experiment!r} ({e.error_code}): ask its admin for EDIT permission on it, or "
                f"use other credentials ({_CREDENTIAL_VARS})"
            ) from None
        raise


def _git_commit(space_file: str | None) -> str:
    where = Path(space_file).resolve().parent if space_file else Path.cwd()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- the Tuner ---------------------------------------------------------------------------------------
def _init_ray(address: str | None, spec: SweepSpec) -> None:
    import ray

    # JSON/CSV result files are added explicitly; no TensorBoard files (MLflow is the record)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # a checkpoint every epoch is the point: no "snapshotting may become a bottleneck" warnings
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    if address in (None, "", "local"):
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as e:
            raise ConfigError(f"--address: cannot connect to Ray at {address}: {e}") from None


def _tuner(spec: SweepSpec, callbacks: list, restore: bool):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .trainable import sweep_trainable

    trainable = tune.with_resources(
        tune.with_parameters(sweep_trainable, spec=spec.model_dump()),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    if restore:
        # The random/grid space holds functions (λ's conditional draw) that Ray saved as placeholders:
        # trials not yet started when the driver died need the same space given back to resolve them.
        space = ray_param_space(spec) if spec.search.algorithm != "optuna" else None
        return tune.Tuner.restore(
            sweep_dir(spec), trainable=trainable, resume_errored=True, param_space=space
        )
    epochs = int(spec.trial["train"]["epochs"])
    if spec.scheduler.type == "asha":
        # ASHA stops a trial once it reaches max_t; one beyond the last epoch lets a trial that
        # trains all its epochs finish its test evaluation and final report.
        scheduler = ASHAScheduler(
            time_attr="epochs_done",
            max_t=(spec.scheduler.max_t or epochs) + 1,
            grace_period=min(spec.scheduler.grace_period, epochs),
            reduction_factor=spec.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    param_space: dict[str, Any] = {}
    search_alg = None
    if spec.search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(
            space=optuna_space(spec),
            metric=spec.metric,
            mode=spec.mode,
            sampler=optuna.samplers.TPESampler(seed=spec.search.seed),
        )
    else:
        from ray.tune.search import BasicVariantGenerator

        param_space = ray_param_space(spec)
        # TuneConfig.max_concurrent_trials only limits a Searcher; the variant generator takes its own
        search_alg = BasicVariantGenerator(
            random_state=spec.search.seed, max_concurrent=spec.max_concurrent_trials or 0
        )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials if spec.search.algorithm == "optuna" else None,
            reuse_actors=spec.reuse_actors,
            metric=spec.metric,
            mode=spec.mode,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[*callbacks, JsonLoggerCallback(), CSVLoggerCallback()],
            verbose=0,
        ),
    )


def _execute(spec: SweepSpec, *, space_file: str | None, address: str | None, restore: bool) -> SweepOutcome:
    check_storage(spec)
    uri = resolve_sweep_tracking_uri(spec)
    check_tracking(uri)
    check_ray_address(address)
    _check_cache(spec)
    _init_ray(address, spec)
    if address not in (None, "", "local"):
        check_shared_storage(spec)
    exp_id, parent = _open_parent_run(uri, spec, space_file, restore)
    from mlflow.tracking import MlflowClient

    from .mlflow_callback import MlflowSweepCallback

    client = MlflowClient(uri)
    try:
        if "://" not in spec.storage_path:
            Path(sweep_dir(spec)).mkdir(parents=True, exist_ok=True)
            (Path(sweep_dir(spec)) / SPEC_FILE).write_text(
                json.dumps({"spec": spec.model_dump(), "space_file": space_file}, indent=2)
            )
        callback = MlflowSweepCallback(uri, exp_id, parent, spec)
        results = _tuner(spec, [callback], restore).fit()
    except BaseException as e:
        client.set_tag(parent, "error", f"{type(e).__name__}: {e}"[:4000])
        client.set_terminated(parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    rows = sweep_rows(results, spec)
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
    if "://" not in spec.storage_path and existing.exists():
        if not overwrite:
            raise ConfigError(
                f"sweep {spec.name!r} already exists in {existing}: continue it with "
                f"`cxr-sweep sweep resume {spec.name} --storage {spec.storage_path}`, pick another name "
                "(--set name=...), or start over with --overwrite"
            )
        shutil.rmtree(existing)
    return _execute(spec, space_file=str(Path(space_file).resolve()), address=address, restore=False)


def load_saved_spec(name_or_path: str, storage: str | Path | None = None) -> tuple[SweepSpec, str | None]:
    candidates = [Path(name_or_path)]
    if storage is not None:
        candidates.insert(0, Path(storage) / name_or_path)
    for d in candidates:
        f = d / SPEC_FILE
        if f.is_file():
            saved = json.loads(f.read_text())
            return SweepSpec.model_validate(saved["spec"]), saved.get("space_file")
    where = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"no sweep {name_or_path!r} found (looked for {SPEC_FILE} in {where}); pass --storage")


def resume_sweep(name_or_path: str, *, storage: str | Path | None = None, address: str | None = None):
    """Continue an interrupted sweep: finished trials are kept, unfinished and errored ones resume."""
    spec, space_file = load_saved_spec(name_or_path, storage)
    from ray import tune

    if not tune.Tuner.can_restore(sweep_dir(spec)):
        raise ConfigError(f"{sweep_dir(spec)}: no Ray experiment state to resume")
    return _execute(spec, space_file=space_file, address=address, restore=True)


def sweep_rows(results, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial from a Ray ``ResultGrid``: state, searched params, best metric, GPU ids."""
    from .space import flatten_ray_config, overrides_from_params
    from .trainable import FINAL_KEY

    rows = []
    for r in results:
        m = r.metrics or {}
        if r.error is not None:
            state = "ERROR"
        elif m.get(FINAL_KEY):
            state = "DONE"
        elif m:
            state = "STOPPED"  # by ASHA, or still running when read during a sweep
        else:
            state = "PENDING"
        best = m.get(f"best_{spec.metric}", m.get(spec.metric, float("nan")))
        rows.append(
            {
                "trial": str(m.get("trial_id") or (Path(r.path).name if r.path else "?")),
                "path": r.path,
                "state": state,
                "params": overrides_from_params(flatten_ray_config(r.config or {})),
                "best": float(best) if best is not None else float("nan"),
                "epochs": int(m.get("epochs_done", 0)),
                "gpu_ids": m.get("gpu_ids", ""),
                "node_id": str(m.get("node_id", ""))[:8],
                "error": str(r.error)[:200] if r.error is not None else "",
            }
        )
    return rows


def read_status(name_or_path: str, storage: str | Path | None = None):
    """The spec and per-trial rows of a sweep, read from Ray's experiment state on storage."""
    from ray import tune

    from .trainable import sweep_trainable

    spec, _ = load_saved_spec(name_or_path, storage)
    if not tune.Tuner.can_restore(sweep_dir(spec)):
        raise ConfigError(f"{sweep_dir(spec)}: no Ray experiment state yet")
    tuner = tune.Tuner.restore(sweep_dir(spec), trainable=sweep_trainable)
    return spec, sweep_rows(tuner.get_results(), spec)
