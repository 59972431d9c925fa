"""The tracking server goes away mid-sweep and comes back: trials go on, every metric arrives.

A real ``mlflow server`` (sqlite backend) on 127.0.0.1 is stopped after the first epochs are
logged and restarted on the same port and database 10 s later. The driver's callback queues
what it could not log and replays it in order once the server answers (see
sweeps/tracking/callback.py); a store that never comes back is reported per trial.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import epochs_logged, sweep_overrides

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, db: Path, artifacts: Path, port: int) -> None:
        self.db, self.artifacts, self.port, self.proc = db, artifacts, port, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--artifacts-destination",
            str(self.artifacts),
            "--workers",
            "1",
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start in 90 s")

    def stop(self) -> None:
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_tracking_server_lost_mid_sweep_every_metric_arrives_when_it_is_back(ne_cache, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from sweeps.driver import run_sweep

    server = Server(tmp_path / "mlflow.db", tmp_path / "artifacts", _free_port())
    server.start()
    outage: dict[str, float] = {}

    def chaos() -> None:
        while epochs_logged(server.db) < 2:
            time.sleep(0.2)
        server.stop()
        outage["down"] = time.monotonic()
        time.sleep(10)
        server.start()
        outage["up"] = time.monotonic()

    sets = sweep_overrides(
        ne_cache,
        tmp_path / "sweeps",
        num_samples="3",
        **{
            "scheduler.type": "fifo",
            "search.algorithm": "random",
            "trial.model.backbone": "test_resnet",
            "trial.train.epochs": "4",
            "mlflow.tracking_uri": server.url,
        },
    )
    thread = threading.Thread(target=chaos, daemon=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        thread.start()
        outcome = run_sweep(ROOT / "search_spaces/demo.yaml", overrides=sets)
        thread.join(timeout=120)
        assert "up" in outage, "the chaos thread never restarted the server"
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("demo")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        children = [r for r in runs if r.data.tags.get("cxr.kind") == "trial"]
        assert [r["state"] for r in outcome.rows] == ["DONE"] * 3
        assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
        stored = 0
        for r in children:
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss"))
            assert steps == list(range(int(r.data.metrics["epochs_run"])))  # every epoch, once
            assert "test_f1_macro" in r.data.metrics
            stored += sum(len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics)
        assert stored == outcome.metrics_logged  # none lost
        print(f"server down for {outage['up'] - outage['down']:.1f} s; {stored} metric values, all stored")
    finally:
        ray.shutdown()
        server.stop()


def test_a_store_that_never_comes_back_is_reported_per_trial(monkeypatch):
    """The end-of-sweep report names the trials whose updates could not be logged."""
    import sweeps.tracking.callback as cb

    monkeypatch.setattr(cb, "FLUSH_GRACE_S", 0.0)
    callback = cb.MlflowSweepCallback.__new__(cb.MlflowSweepCallback)
    callback.tracking_uri = "http://127.0.0.1:9"
    callback.pending = [("_trial_result", "trial_a", ({},)), ("_trial_complete", "trial_b", ())]
    callback.unreachable_since = time.monotonic()
    with pytest.raises(
        cb.TrackingUnavailable, match=r"2 update\(s\) of 2 trial\(s\) were not logged: trial_a, trial_b"
    ):
        callback.on_experiment_end([])


def test_a_request_stored_before_its_response_was_lost_is_not_logged_twice(tmp_path):
    """The store went away after writing epoch 0 but before answering: the replay must not log it
    again (the flaky duplicate step seen once in the live-server test above)."""
    from types import SimpleNamespace

    import requests
    from mlflow.tracking import MlflowClient

    import sweeps.tracking.callback as cb

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("lost-response")
    run_id = client.create_run(exp).info.run_id
    callback = cb.MlflowSweepCallback.__new__(cb.MlflowSweepCallback)
    callback.client, callback.tracking_uri = client, "sqlite"
    callback.spec = SimpleNamespace(metric="val_f1_macro", mode="max", name="lost-response")
    callback.runs, callback.described, callback.tagged = {"t1": run_id}, {"t1"}, {"t1"}
    callback.last_epoch, callback.best, callback.logged_metrics = {run_id: -1}, {}, 0
    callback.pending, callback.unreachable_since, callback.interrupted = [], None, set()
    trial = SimpleNamespace(trial_id="t1")
    real = client.log_batch

    def stored_then_lost(*args, **kwargs):
        real(*args, **kwargs)
        raise requests.ConnectionError("connection reset by peer")

    client.log_batch = stored_then_lost
    callback.on_trial_result(0, [], trial, {"epoch": 0, "train_loss": 1.0, "val_f1_macro": 0.5})
    assert len(callback.pending) == 1  # queued: the callback cannot know the write landed
    client.log_batch = real
    callback.on_trial_result(1, [], trial, {"epoch": 1, "train_loss": 0.5, "val_f1_macro": 0.6})
    assert callback.pending == []
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert steps == [0, 1]
    assert callback.logged_metrics == 4  # epoch 0's two values count once: they are in the store


def test_a_summary_stored_before_its_response_was_lost_is_not_logged_twice(tmp_path):
    """The store went away after writing a finished trial's summary but before answering (seen once
    in CI: 33 values stored twice): the replay finishes the run without logging the summary again."""
    from types import SimpleNamespace

    import requests
    from mlflow.tracking import MlflowClient

    import sweeps.tracking.callback as cb

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("lost-summary")
    run_id = client.create_run(exp).info.run_id
    callback = cb.MlflowSweepCallback.__new__(cb.MlflowSweepCallback)
    callback.client, callback.tracking_uri = client, "sqlite"
    callback.runs, callback.described, callback.interrupted = {"t1": run_id}, {"t1"}, set()
    callback.logged_metrics, callback.pending, callback.unreachable_since = 0, [], None
    callback.last_epoch = {}
    last = {
        cb.FINAL_KEY: True,
        "best_epoch": 2,
        "epochs_run": 3,
        "test_f1_macro": 0.7,
        "best_val_f1_macro": 0.8,
    }
    trial = SimpleNamespace(trial_id="t1", last_result=last, checkpoint=None)
    real = client.log_batch

    def stored_then_lost(*args, **kwargs):
        real(*args, **kwargs)
        raise requests.ConnectionError("connection reset by peer")

    client.log_batch = stored_then_lost
    callback.on_trial_complete(0, [], trial)
    assert len(callback.pending) == 1 and callback.logged_metrics == 0
    client.log_batch = real
    callback._flush()  # the store answers again: the queued completion is replayed
    assert callback.pending == []
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    stored = sum(len(client.get_metric_history(run_id, k)) for k in run.data.metrics)
    assert stored == 4 and callback.logged_metrics == 4  # each value once, and counted once
