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

from sweeps.tracking.writer import RETRY_S
from tests.conftest import bare_callback, epochs_logged, sweep_overrides

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
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
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
    import requests

    import sweeps.tracking.callback as cb

    monkeypatch.setattr(cb, "FLUSH_GRACE_S", 0.0)
    callback = bare_callback(None)
    callback.tracking_uri = "http://127.0.0.1:9"

    def store_down(name, trial, args):
        raise requests.ConnectionError("connection refused")

    callback.writer.run = store_down
    callback.on_trial_result(0, [], "trial_a", {})
    callback.on_trial_complete(0, [], "trial_b")
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

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("lost-response")
    run_id = client.create_run(exp).info.run_id
    callback = bare_callback(client, runs={"t1": run_id}, described={"t1"}, tagged={"t1"})
    callback.last_epoch = {run_id: -1}
    trial = SimpleNamespace(trial_id="t1")
    real = client.log_batch

    def stored_then_lost(*args, **kwargs):
        real(*args, **kwargs)
        raise requests.ConnectionError("connection reset by peer")

    client.log_batch = stored_then_lost
    callback.on_trial_result(0, [], trial, {"epoch": 0, "train_loss": 1.0, "val_f1_macro": 0.5})
    assert len(callback.writer.drain(0)) == 1  # queued: the callback cannot know the write landed
    client.log_batch = real
    callback.on_trial_result(1, [], trial, {"epoch": 1, "train_loss": 0.5, "val_f1_macro": 0.6})
    assert callback.writer.drain(0) == []
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
    callback = bare_callback(client, runs={"t1": run_id}, described={"t1"})
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
    assert len(callback.writer.drain(0)) == 1 and callback.logged_metrics == 0
    client.log_batch = real
    # the store answers again: the writer retries the queued completion within RETRY_S
    assert callback.writer.drain(10 * RETRY_S) == []
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    stored = sum(len(client.get_metric_history(run_id, k)) for k in run.data.metrics)
    assert stored == 4 and callback.logged_metrics == 4  # each value once, and counted once


@pytest.mark.parametrize("repeats", [1, 2])
def test_a_run_created_before_its_response_was_lost_is_not_created_twice(tmp_path, repeats):
    """create_run landed but its response was lost (the race of a store going away mid-request): the
    replay finds the run by its trial id instead of making a second one (seed runs alike)."""
    from types import SimpleNamespace

    import requests
    import yaml
    from mlflow.tracking import MlflowClient

    from sweeps.space import load_sweep
    from sweeps.tracking.callback import MlflowSweepCallback

    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / "search_spaces/demo.yaml").read_text())
    raw["trial"]["data"]["cache"] = str(tmp_path / "cache")  # not read: no trial runs
    raw |= {"storage_path": str(tmp_path), "repeats": repeats}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
    spec, _ = load_sweep(tmp_path / "space.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("lost-create")
    parent = client.create_run(exp).info.run_id
    callback = MlflowSweepCallback(uri, exp, parent, spec)
    real = callback.client.create_run
    lost = {"n": 0}

    def created_then_lost(*args, **kwargs):
        run = real(*args, **kwargs)
        if lost["n"] < repeats:  # the trial's run, then (repeats) its first seed's
            lost["n"] += 1
            raise requests.ConnectionError("connection reset by peer")
        return run

    callback.client.create_run = created_then_lost

    class Trial(SimpleNamespace):
        def __str__(self) -> str:
            return "t1"

    trial = Trial(trial_id="t1", config={"train.lr": 0.002}, path=str(tmp_path), local_path=None)
    seeds = [{"epoch": 0, "train_loss": 1.0}] * repeats if repeats > 1 else None
    result = {"epoch": 0, "train_loss": 1.0, "val_f1_macro": 0.5, **({"seeds": seeds} if seeds else {})}
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, result)
    assert callback.writer.drain(6 * RETRY_S) == []  # every lost create replayed
    runs = client.search_runs([exp], "tags.`ray.trial_id` = 't1'")
    kinds = sorted(r.data.tags["cxr.kind"] for r in runs)
    assert kinds == (["seed", "seed", "trial"] if repeats > 1 else ["trial"])  # one run each, not two
    (config_run,) = [r for r in runs if r.data.tags["cxr.kind"] == "trial"]
    assert config_run.data.params["train.lr"] == "0.002"  # described once it was found
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")]
        assert steps == [0], (r.data.tags["cxr.kind"], steps)
