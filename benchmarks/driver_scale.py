"""How far one sweep driver scales: simulated trials through the real driver, callback and storage.

Every result of every trial passes through one process: Tune's event loop and the MLflow callback
(the only writer). The simulated trials train nothing but report like real ones: every
``--period`` seconds the metrics a real trial logs (the real names, from ``trainer.metrics``), a
small checkpoint every epoch, and a final report with ``test_*`` metrics, predictions, a plot and
the resolved config. Two modes:

- ``ray``: the trials run as Ray actors through ``sweeps.driver.run_sweep`` (random search, FIFO)
  on one node with as many fake CPUs as trials at once: Tune, the callback and storage for real.
  On a 2-core machine the actors themselves (a process each) take the CPUs from 16 at once on.
- ``replay``: the callback alone, fed from one thread as Tune's event loop feeds it (start,
  results, final report with its checkpoint, completion): what the driver's writer sustains,
  without the simulated cluster competing for the same cores. 256 at once fit here only this way.

Measured per scenario (mode × store × writers × trials at once × trials in all): results per
second sustained (epoch results logged, first to last); latency from a trial's report (its
timestamp) to the callback having logged it, p50/p99; driver CPU time and RSS (sampled); the
tracking store's size per trial (sqlite file, or ``pg_database_size``); lost and duplicated
epochs (every trial run's ``val_f1_macro`` history, straight from the store's tables) and values
logged against values stored; ``cxr-sweep best`` (and, ``ray``, ``sweep status``) wall time at the
end, each a fresh process. ``--writers 0,default`` runs each scenario with the callback writing
in Tune's thread (``CXR_TRACKING_WRITERS=0``, as before the writer threads) and as shipped, side
by side; ``--restart-at S`` kills the tracking server S seconds in and starts it 10 s later.

Stores: ``sqlite`` (the embedded default) and ``server`` (``mlflow/serve.sh`` on PostgreSQL with
basic auth, as ``tests/test_tracking_server.py`` starts it; needs ``.ci/setup.d/postgres.sh``).

    python benchmarks/driver_scale.py --mode replay --stores sqlite,server --concurrent 64 \
        --epochs 10 --period 0 --writers 0,default --out benchmarks/results/driver_scale_throughput.json
    python benchmarks/driver_scale.py --smoke   # a minute: 4 trials, sqlite, both modes (the tests run it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PG_URI = os.environ.get("CXR_TEST_POSTGRES_URI", "postgresql://cxr_test:cxr_test@127.0.0.1:5432/cxr_test")
PROFILE: Path | None = None  # --profile: the driver's cProfile stats of the last scenario go there
PERIOD = 1.0  # seconds between a simulated trial's reports (set from --period before the sweep)
TUNE_VALUES = "scheduling"  # what a simulated trial sends Tune as numbers: as the product does, or "all"
EPOCH_NAMES: list[str] = []  # the per-epoch metric names of a real trial (set in main)
FINAL_NAMES: list[str] = []


def simulated_trial(config: dict, spec: dict) -> None:
    """A trial that trains nothing: real metric names, a small checkpoint per epoch, a final report.
    Defined here (``__main__``), so Ray ships it to its workers by value."""
    import random

    import ray
    from ray import tune

    from sweeps.driver.trainable import scheduling_keys
    from sweeps.reports import pack
    from sweeps.space import SweepSpec

    keep = scheduling_keys(SweepSpec.model_validate(spec))

    def send(values: dict, folder: Path) -> None:  # as the real trainable reports (or everything)
        values = pack(values, keep) if TUNE_VALUES == "scheduling" else values
        tune.report(values, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    epochs = int(spec["trial"]["train"]["epochs"])
    rng = random.Random(tune.get_context().get_trial_id())
    info = {"gpu_ids": "", "node_id": ray.get_runtime_context().get_node_id()}
    scratch = Path(tempfile.mkdtemp(prefix="cxr-sim-"))
    start, best = 0, 0.0
    if (ckpt := tune.get_checkpoint()) is not None:  # a retried trial continues after its last epoch
        start = json.loads((Path(ckpt.to_directory()) / "progress.json").read_text())["next_epoch"]
    for epoch in range(start, epochs):
        time.sleep(PERIOD * rng.uniform(0.8, 1.2))
        metrics = {k: rng.random() for k in EPOCH_NAMES}
        best = max(best, metrics["val_f1_macro"])
        d = scratch / f"epoch_{epoch}"
        d.mkdir()
        (d / "progress.json").write_text(json.dumps({"next_epoch": epoch + 1}))
        (d / "state.bin").write_bytes(os.urandom(4096))  # a small checkpoint
        report = {
            **metrics,
            "epoch": float(epoch),
            "epochs_done": epoch + 1,
            "best_epoch": epoch,
            "best_val_f1_macro": best,
            "last_epoch": float(epoch + 1 == epochs),
            "sent_at": time.time(),
            **info,
        }
        send(report, d)
    final = scratch / "final"
    (final / "plots").mkdir(parents=True)
    (final / "plots" / "confusion_matrix.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2048))
    (final / "config.resolved.yaml").write_text(yaml.safe_dump({"trial": spec["trial"], "config": config}))
    rows = "".join(f"test,{i},{i % 2},{rng.random():.4f},{rng.random():.4f}\n" for i in range(100))
    (final / "predictions.csv").write_text("split,row,label,p_0,p_1\n" + rows)
    summary = {k: rng.random() for k in FINAL_NAMES}
    summary |= {"val_f1_macro": best, "best_epoch": epochs - 1, "epochs_run": epochs, "epochs_done": epochs}
    summary |= {"data_access": "synthetic", "trial_done": 1, "sent_at": time.time(), **info}
    send(summary, final)


# ---- the stores -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def sqlite_store(work: Path):
    db = work / "mlflow.db"
    uri = f"sqlite:///{db}"
    yield {"uri": uri, "backend": uri, "size": lambda: db.stat().st_size, "env": {}}


@contextlib.contextmanager
def server_store(work: Path):
    """``mlflow/serve.sh`` on a throwaway PostgreSQL database, basic auth, artifacts in ``work``."""
    import requests
    import sqlalchemy

    admin = sqlalchemy.create_engine(PG_URI, isolation_level="AUTOCOMMIT")
    name = f"cxr_scale_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    backend = PG_URI.rsplit("/", 1)[0] + f"/{name}"
    user, password = "admin", "admin-" + secrets.token_hex(8)
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": backend,
        "MLFLOW_ARTIFACTS_DESTINATION": str(work / "artifacts"),
        "MLFLOW_AUTH_ADMIN_USERNAME": user,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "2",
        "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow"),
    }
    url = f"http://127.0.0.1:{port}"
    server = {"proc": None}

    def up() -> None:
        log = (work / "server.log").open("a")
        server["proc"] = proc = subprocess.Popen(
            ["bash", str(ROOT / "mlflow/serve.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: uvicorn workers go down with it
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow/serve.sh did not come up:\n{(work / 'server.log').read_text()[-2000:]}"
                )
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)

    def down() -> None:
        os.killpg(server["proc"].pid, signal.SIGKILL)  # a crash, not a clean stop
        server["proc"].wait(timeout=60)

    def restart(after_s: float) -> None:
        """Kill the server now and start it again ``after_s`` later (same port, same database)."""
        down()
        time.sleep(after_s)
        up()

    def size() -> int:
        with admin.connect() as c:
            return int(c.execute(sqlalchemy.text(f"SELECT pg_database_size('{name}')")).scalar())

    try:
        up()
        auth = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
        yield {"uri": url, "backend": backend, "size": size, "env": auth, "restart": restart}
    finally:
        if server["proc"] is not None and server["proc"].poll() is None:
            os.killpg(server["proc"].pid, signal.SIGTERM)
            server["proc"].wait(timeout=60)
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


STORES = {"sqlite": sqlite_store, "server": server_store}


# ---- one scenario ---------------------------------------------------------------------------------
class _Sampler(threading.Thread):
    """The driver's RSS (MiB) every ``every`` seconds."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.wait(self.every):
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page
            self.samples.append((time.monotonic(), rss / 2**20))


def _sweep_file(work: Path, cache: Path, uri: str, concurrent: int, trials: int, epochs: int) -> Path:
    sweep = {
        "name": f"scale-{concurrent}-{trials}",
        "trial": {
            "data": {"cache": str(cache), "task": "ne"},
            "model": {"backbone": "test_resnet", "image_size": 64},
            "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-3},
            "attention": {"mode": "soft", "tau": 0.1, "cam_target": "label"},
        },
        "params": {
            "attention.lambda": {"type": "uniform", "low": 0.25, "high": 1.0},
            "train.lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3},
        },
        "search": {"algorithm": "random", "seed": 0},
        "scheduler": {"type": "fifo"},
        "num_samples": trials,
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent_trials": concurrent,
        "metric": "val_f1_macro",
        "storage_path": str(work / "storage"),
        "mlflow": {"tracking_uri": uri},
        "max_failures": 1,
    }
    path = work / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def _final_files(d: Path, spec_trial: dict, config: dict, rng) -> Path:
    """What a finished trial's final checkpoint holds for the driver: a plot, its config, predictions."""
    (d / "plots").mkdir(parents=True)
    (d / "plots" / "confusion_matrix.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2048))
    (d / "config.resolved.yaml").write_text(yaml.safe_dump({"trial": spec_trial, "config": config}))
    rows = "".join(f"test,{i},{i % 2},{rng.random():.4f},{rng.random():.4f}\n" for i in range(100))
    (d / "predictions.csv").write_text("split,row,label,p_0,p_1\n" + rows)
    return d


class _ReplayTrial:
    """What the callback reads of a Ray trial."""

    def __init__(self, tid: str, config: dict, path: Path) -> None:
        self.trial_id, self.config, self.path, self.local_path = tid, config, str(path), str(path)
        self.checkpoint, self.last_result = None, {}

    def __str__(self) -> str:
        return f"sim_{self.trial_id}"


def replay(space: Path, concurrent: int, n_trials: int, epochs: int, work: Path):
    """The driver's half without Ray: ``n_trials`` trials, ``concurrent`` at once, each reporting every
    ``PERIOD`` s (or as fast as the callback takes them: ``--period 0``), fed to the real callback's
    hooks from one thread as Tune's event loop would. Returns what run_sweep would (name, parent…)."""
    import heapq
    import random
    from types import SimpleNamespace

    from ray.tune import Checkpoint

    from sweeps.space import FINAL_KEY, load_sweep
    from sweeps.tracking.callback import MlflowSweepCallback
    from sweeps.tracking.parent import close_parent_run, open_parent_run
    from sweeps.tracking.store import resolve_tracking_uri

    spec, _ = load_sweep(space)
    uri = resolve_tracking_uri(spec=spec)
    exp_id, parent = open_parent_run(uri, spec, str(space), restore=False)
    callback = MlflowSweepCallback(uri, exp_id, parent, spec)
    rng = random.Random(0)
    started, due = 0, []  # heap of (time, sequence, trial, epoch)
    t0 = time.monotonic()

    def start(now: float) -> None:
        nonlocal started
        config = {"attention.lambda": rng.uniform(0.25, 1.0), "train.lr": 10 ** rng.uniform(-3.5, -2.5)}
        trial = _ReplayTrial(f"{started:05d}", config, work / "trials" / f"{started:05d}")
        callback.on_trial_start(0, [], trial)
        heapq.heappush(due, (now + PERIOD * rng.uniform(0.8, 1.2), started, trial, 0))
        started += 1

    while started < min(concurrent, n_trials):
        start(t0)
    while due:
        at, seq, trial, epoch = heapq.heappop(due)
        if (wait := at - time.monotonic()) > 0:
            time.sleep(wait)
        node = {"gpu_ids": "", "node_id": "sim"}
        if epoch < epochs:
            metrics = {k: rng.random() for k in EPOCH_NAMES}
            result = {**metrics, "epoch": float(epoch), "epochs_done": epoch + 1, "best_epoch": epoch}
            # sent when it was due: a driver that falls behind makes the results wait
            sent = time.time() + (at - time.monotonic())
            result |= {"best_val_f1_macro": metrics["val_f1_macro"], "sent_at": sent, **node}
            trial.last_result = result
            callback.on_trial_result(0, [], trial, result)
            heapq.heappush(due, (at + PERIOD * rng.uniform(0.8, 1.2), seq, trial, epoch + 1))
            continue
        final = {k: rng.random() for k in FINAL_NAMES} | {"best_epoch": epochs - 1, "epochs_run": epochs}
        final |= {"data_access": "synthetic", FINAL_KEY: 1, **node}
        d = _final_files(Path(trial.path) / "final", spec.trial, trial.config, rng)
        trial.checkpoint, trial.last_result = Checkpoint.from_directory(str(d)), final
        callback.on_trial_result(0, [], trial, final)
        callback.on_trial_complete(0, [], trial)
        if started < n_trials:
            start(at)
    callback.on_experiment_end([])
    close_parent_run(uri, parent, spec, [])
    return SimpleNamespace(name=spec.name, parent_run_id=parent, metrics_logged=callback.logged_metrics)


def scenario(
    store: str,
    concurrent: int,
    n_trials: int,
    epochs: int,
    cache: Path,
    work: Path,
    writers: str = "default",
    mode: str = "ray",
    restart_at: float = 0.0,
) -> dict:
    import ray

    import sweeps.driver.trainable as trainable_module
    from sweeps.driver import run_sweep
    from sweeps.tracking.callback import MlflowSweepCallback

    latencies: list[float] = []  # a report's timestamp (in the worker) → the callback has logged it
    logged_at: list[float] = []  # when the callback had logged each epoch result

    def timed(trial, results):  # where the callback logs (its writer thread, or Tune's)
        now, mono = time.time(), time.monotonic()
        for result in results:
            if "sent_at" in result:
                latencies.append(now - result["sent_at"])
                logged_at.append(mono)

    os.environ.pop("CXR_TRACKING_WRITERS", None)
    if writers != "default":
        os.environ["CXR_TRACKING_WRITERS"] = writers
    with STORES[store](work) as st:
        os.environ.update(st["env"])
        space = _sweep_file(work, cache, st["uri"], concurrent, n_trials, epochs)
        if mode == "ray":
            if simulated_trial.__module__ != "__main__":  # imported (the tests): workers cannot import it
                ray.cloudpickle.register_pickle_by_value(sys.modules[simulated_trial.__module__])
            ray.init(address="local", num_cpus=concurrent, num_gpus=0, include_dashboard=False,
                     log_to_driver=False, configure_logging=False,
                     object_store_memory=200 * 2**20)  # fmt: skip
        real = trainable_module.sweep_trainable
        trainable_module.sweep_trainable = simulated_trial
        MlflowSweepCallback.after_log = staticmethod(timed)
        sampler = _Sampler()
        sampler.start()
        restarts = []
        if restart_at:  # the tracking server crashes this many seconds in, and is back 10 s later

            def crash() -> None:
                t = time.monotonic()
                st["restart"](10.0)
                restarts.append(round(time.monotonic() - t, 1))

            threading.Timer(restart_at, crash).start()
        cpu0, t0 = time.process_time(), time.monotonic()
        profiler = None
        if PROFILE:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        try:
            outcome = run_sweep(space) if mode == "ray" else replay(space, concurrent, n_trials, epochs, work)
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(str(PROFILE))
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
            sampler.stop.set()
            trainable_module.sweep_trainable = real
            MlflowSweepCallback.after_log = None
            if mode == "ray":
                ray.shutdown()
        lost, dup, stored = _check_runs(st["backend"], outcome, epochs)
        env = {**os.environ, "MLFLOW_TRACKING_URI": st["uri"]}
        cli = str(Path(sys.executable).parent / "cxr-sweep")
        commands = {"best_s": [cli, "best", outcome.name, "--tracking-uri", st["uri"]]}
        if mode == "ray":  # status reads Ray's experiment state: a replay has none
            commands["status_s"] = [cli, "sweep", "status", outcome.name, "--storage", str(work / "storage")]
        timings = {}
        for what, args in commands.items():
            t = time.monotonic()
            out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
            timings[what] = round(time.monotonic() - t, 2)
            if out.returncode != 0:  # a finding too (e.g. the store too slow to answer): kept, not raised
                timings[what.removesuffix("_s") + "_error"] = out.stderr.strip()[-500:]
        rss = [m for _, m in sampler.samples]
        # after the first 10 % of the results: MLflow, SQLAlchemy and the first runs are loaded by then
        warm_at = logged_at[len(logged_at) // 10] if logged_at else 0.0
        warm = [m for t, m in sampler.samples if t >= warm_at]
        results = n_trials * (epochs + 1)  # epochs and the final report
        return {
            "mode": mode,
            "store": store,
            "writers": writers,  # the callback's writer threads; 0: every hook in Tune's thread
            # ray: what the trials sent Tune as numbers (scheduling: the product's; all: before)
            "tune_values": TUNE_VALUES if mode == "ray" else None,
            "concurrent": concurrent,
            "trials": n_trials,
            "epochs": epochs,
            "period_s": PERIOD,
            "offered_results_per_s": round(concurrent / PERIOD, 1) if PERIOD else None,
            "results": results,
            "wall_s": round(wall, 1),
            "results_per_s_overall": round(results / wall, 1),  # with start-up and the last trial's end
            # sustained: epoch results logged, from the first to the last
            "results_per_s": round((len(logged_at) - 1) / (logged_at[-1] - logged_at[0]), 1),
            "latency_p50_s": round(_pct(latencies, 0.5), 3),
            "latency_p99_s": round(_pct(latencies, 0.99), 3),
            "latency_max_s": round(max(latencies, default=float("nan")), 3),
            "driver_cpu_s": round(cpu, 1),
            "driver_cpu_ms_per_result": round(1000 * cpu / results, 2),
            "driver_rss_start_mib": round(rss[0], 1) if rss else None,
            "driver_rss_peak_mib": round(max(rss), 1) if rss else None,
            "driver_rss_end_mib": round(rss[-1], 1) if rss else None,
            "driver_rss_after_10pct_mib": round(warm[0], 1) if warm else None,
            "store_bytes_per_trial": int(st["size"]() / n_trials),
            "metric_values_logged": outcome.metrics_logged,
            "metric_values_stored": stored,
            "lost_epochs": lost,
            "duplicated_epochs": dup,
            "server_down_s": restarts,  # tracking-server crashes: seconds until it answered again
            **timings,
        }


def _check_runs(backend: str, outcome, epochs: int) -> tuple[int, int, int]:
    """Epochs missing from, and logged twice to, the trial runs' ``val_f1_macro`` histories, and the
    metric values stored in those runs: straight from the store's tables (one query each)."""
    import sqlalchemy

    trial_runs = (
        "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "JOIN tags p ON p.run_uuid = r.run_uuid "
        "WHERE t.key = 'cxr.kind' AND t.value = 'trial' "
        "AND p.key = 'mlflow.parentRunId' AND p.value = :parent"
    )
    engine = sqlalchemy.create_engine(backend)
    with engine.connect() as c:
        runs = [row[0] for row in c.execute(sqlalchemy.text(trial_runs), {"parent": outcome.parent_run_id})]
        steps = c.execute(
            sqlalchemy.text(
                f"SELECT run_uuid, step, count(*) FROM metrics WHERE key = 'val_f1_macro' "
                f"AND run_uuid IN ({trial_runs}) GROUP BY run_uuid, step"
            ),
            {"parent": outcome.parent_run_id},
        ).all()
        stored = c.execute(
            sqlalchemy.text(f"SELECT count(*) FROM metrics WHERE run_uuid IN ({trial_runs})"),
            {"parent": outcome.parent_run_id},
        ).scalar()
    engine.dispose()
    seen: dict[str, set[int]] = {r: set() for r in runs}
    dup = 0
    for run, step, n in steps:
        seen.setdefault(run, set()).add(int(step))
        dup += int(n) - 1
    lost = sum(len(set(range(epochs)) - s) for s in seen.values())
    return lost, dup, int(stored)


def _names() -> None:
    from trainer.metrics.names import logged_names

    EPOCH_NAMES[:] = [*logged_names("train_"), *logged_names("val_"), "lambda", "lr"]
    EPOCH_NAMES.extend(["epoch_time_s", "epoch_train_s", "epoch_val_s"])
    FINAL_NAMES[:] = [*logged_names("best_val_"), *logged_names("test_")]


def main(argv: list[str] | None = None) -> int:
    global PERIOD, PROFILE, TUNE_VALUES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", default="sqlite,server")
    ap.add_argument("--concurrent", default="16,64", help="trials at once, comma-separated")
    ap.add_argument("--trials", type=int, default=0, help="trials in all (default: as many as at once)")
    ap.add_argument(
        "--long", type=int, default=0, help="also one sweep of this many trials at the largest concurrency"
    )
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--writers", default="default", help="CXR_TRACKING_WRITERS per scenario, e.g. 0,default")
    ap.add_argument(
        "--mode", default="ray", help="ray (simulated trials through Tune), replay (the callback alone)"
    )
    ap.add_argument("--period", type=float, default=1.0, help="seconds between a trial's reports")
    ap.add_argument(
        "--tune-values",
        default="scheduling",
        help="ray: what trials send Tune as numbers, per scenario: scheduling (as shipped), all (before)",
    )
    ap.add_argument(
        "--restart-at", type=float, default=0.0, help="crash the server this many s in (10 s down)"
    )
    ap.add_argument("--smoke", action="store_true", help="4 trials of 3 epochs on sqlite, both modes")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", type=Path, help="write the driver's cProfile stats here")
    args = ap.parse_args(argv)
    if args.smoke:  # both modes, both writers, on sqlite: what the tests run
        args.stores, args.concurrent, args.trials, args.epochs, args.period = "sqlite", "2", 4, 3, 0.2
        args.mode, args.writers = "replay,ray", "0,default"
    PERIOD, PROFILE = args.period, args.profile
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    _names()
    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms
    from trainer.tasks import classes_for

    scenarios = []
    with tempfile.TemporaryDirectory(prefix="cxr-scale-") as tmp:
        tmp = Path(tmp)
        generate(tmp / "phantoms", n_patients=12, classes=classes_for("ne"), size=64, seed=0)
        cache = cache_from_phantoms(tmp / "phantoms", tmp / "cache" / "ne", "ne")
        stores, widths = args.stores.split(","), [int(c) for c in args.concurrent.split(",")]
        writers, modes = args.writers.split(","), args.mode.split(",")
        values = args.tune_values.split(",")
        sizes = [(c, args.trials or c) for c in widths] + ([(max(widths), args.long)] if args.long else [])
        plan = [
            (s, c, n, w, m, v)
            for m in modes
            for s in stores
            for c, n in sizes
            for w in writers
            for v in (values if m == "ray" else values[:1])  # a replay sends Tune nothing
        ]
        for i, (store, concurrent, trials, w, m, v) in enumerate(plan):
            work = tmp / f"s{i}"
            work.mkdir()
            restart = args.restart_at if store == "server" else 0.0
            TUNE_VALUES = v
            row = scenario(store, concurrent, trials, args.epochs, cache, work, w, m, restart)
            print(json.dumps(row), flush=True)
            scenarios.append(row)
    doc = {
        "benchmark": "driver_scale",
        "command": "python benchmarks/driver_scale.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "scenarios": scenarios,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    bad = [r for r in scenarios if r["lost_epochs"] or r["duplicated_epochs"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
