"""The tracking writer: hooks off Tune's event loop, in order per trial, coalesced, replayed."""

import threading
import time
from types import SimpleNamespace

import pytest
import requests

from sweeps.tracking.writer import RETRY_S, TrackingWriter, coalesce, writers_for


def _t(tid: str):
    return SimpleNamespace(trial_id=tid)


def test_coalesce_merges_a_trials_consecutive_results_only():
    a, b = _t("a"), _t("b")
    items = [
        ("_trial_start", a, ()),
        ("_trial_result", a, ({"epoch": 0},)),
        ("_trial_result", b, ({"epoch": 0},)),  # another trial between: a's results still merge
        ("_trial_result", a, ({"epoch": 1},)),
        ("_trial_complete", a, ()),
        ("_trial_result", a, ({"epoch": 2},)),  # after a's completion (a retry): a new group
        ("_trial_result", b, ({"epoch": 1},)),
    ]
    out = coalesce(items)
    assert [(n, t.trial_id, [r["epoch"] for r in args[0]] if args else None) for n, t, args in out] == [
        ("_trial_start", "a", None),
        ("_trial_results", "a", [0, 1]),
        ("_trial_results", "b", [0, 1]),
        ("_trial_complete", "a", None),
        ("_trial_results", "a", [2]),
    ]


def test_writers_one_for_a_file_store_several_for_a_server(monkeypatch):
    assert writers_for("sqlite:////tmp/mlflow.db") == 1
    assert writers_for("http://127.0.0.1:5000") == 4
    monkeypatch.setenv("CXR_TRACKING_WRITERS", "8")
    assert writers_for("https://mlflow.example.org") == 8
    assert writers_for("sqlite:////tmp/mlflow.db") == 1  # sqlite takes one writer
    monkeypatch.setenv("CXR_TRACKING_WRITERS", "0")
    assert writers_for("sqlite:////tmp/mlflow.db") == writers_for("http://127.0.0.1:5000") == 0


def test_zero_writers_run_every_hook_in_the_callers_thread():
    calls = []
    writer = TrackingWriter(lambda n, t, a: calls.append((threading.current_thread(), n)), 0, print)
    writer.submit("_trial_start", _t("a"))
    writer.submit("_trial_result", _t("a"), {"epoch": 0})
    me = threading.current_thread()
    assert calls == [(me, "_trial_start"), (me, "_trial_result")]  # as they came, one by one
    assert writer.drain(0) == []


def test_hooks_run_off_the_callers_thread_in_order_per_trial_and_coalesced():
    calls, gate = [], threading.Event()

    def run(name, trial, args):
        gate.wait(10)  # the store is slow: results pile up meanwhile
        calls.append((threading.current_thread().name, name, trial.trial_id, args))

    writer = TrackingWriter(run, 4, lambda trial: None)
    trials = [_t(f"t{i}") for i in range(8)]
    t0 = time.monotonic()
    for t in trials:
        writer.submit("_trial_start", t)
    for epoch in range(5):
        for t in trials:
            writer.submit("_trial_result", t, {"epoch": epoch})
    for t in trials:
        writer.submit("_trial_complete", t)
    assert time.monotonic() - t0 < 1.0  # submitting never waits for the store
    gate.set()
    assert writer.drain(0) == []
    assert all(thread == "cxr-mlflow-writer" for thread, *_ in calls)
    for t in trials:
        mine = [(name, args) for _, name, tid, args in calls if tid == t.trial_id]
        assert mine[0][0] == "_trial_start" and mine[-1][0] == "_trial_complete"
        epochs = [r["epoch"] for name, args in mine if name == "_trial_results" for r in args[0]]
        assert epochs == [0, 1, 2, 3, 4]  # every result once, in order
    results_calls = sum(1 for _, name, *_ in calls if name == "_trial_results")
    assert results_calls < 8 * 5  # results that waited went in fewer calls


def test_a_hooks_own_error_is_raised_in_the_callers_thread():
    def run(name, trial, args):
        raise ValueError("a bug in a hook")

    writer = TrackingWriter(run, 1, lambda trial: None)
    writer.submit("_trial_start", _t("a"))
    with pytest.raises(ValueError, match="a bug in a hook"):
        writer.drain(0)
    writer.submit("_trial_start", _t("b"))  # raised once: Tune's clean-up that follows goes on
    assert isinstance(writer.error, ValueError)


def test_an_unreachable_store_queues_in_order_and_replays_when_back(capsys):
    down, logged, forgotten = [True], [], []

    def run(name, trial, args):
        if down[0]:
            raise requests.ConnectionError("connection refused")
        logged.append((name, trial.trial_id))

    writer = TrackingWriter(run, 1, lambda trial: forgotten.append(trial.trial_id))
    a = _t("a")
    writer.submit("_trial_start", a)
    writer.submit("_trial_result", a, {"epoch": 0})
    writer.submit("_trial_complete", a)
    assert [n for n, *_ in writer.drain(0)] == ["_trial_start", "_trial_results", "_trial_complete"]
    assert forgotten and logged == []
    down[0] = False
    assert writer.drain(3 * RETRY_S) == []  # the worker retries on its own
    assert logged == [("_trial_start", "a"), ("_trial_results", "a"), ("_trial_complete", "a")]
    out = capsys.readouterr().out
    assert "MLflow tracking store unreachable (ConnectionError)" in out and "queued updates logged" in out


def test_close_stops_the_workers_and_drops_what_is_queued():
    def run(name, trial, args):
        raise requests.ConnectionError("connection refused")

    writer = TrackingWriter(run, 1, lambda trial: None)
    writer.submit("_trial_start", _t("a"))
    writer.drain(0)
    writer.close()
    thread = writer.shards[0].thread
    if thread is not None:
        thread.join(5)
    assert writer.shards[0].thread is None


def test_the_callback_logs_coalesced_epochs_in_one_request(tmp_path):
    """Five epochs that waited for the store: one log_batch of metrics for the five, every step once."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import bare_callback

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("coalesced")).info.run_id
    callback = bare_callback(client, runs={"t1": run_id}, described={"t1"}, tagged={"t1"})
    callback.last_epoch = {run_id: -1}
    requests_made, real, gate = [], client.log_batch, threading.Event()

    def counted(run, metrics=(), **kw):
        gate.wait(10)
        requests_made.append(sorted({m.step for m in metrics}))
        return real(run, metrics=metrics, **kw)

    client.log_batch = counted
    trial = _t("t1")
    for epoch in range(5):
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "lr": 0.1})
    gate.set()
    assert callback.writer.drain(0) == []
    assert sorted(s for r in requests_made for s in r) == [0, 1, 2, 3, 4]
    assert len(requests_made) <= 2  # the first epoch alone (the worker was waiting), then the rest
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert steps == [0, 1, 2, 3, 4] and callback.logged_metrics == 10


def test_tunes_state_save_waits_for_the_writer(tmp_path):
    """Tune saves the experiment state (a resumed sweep restores it) after asking the callbacks for
    theirs: the callback lets the writer catch up first, so that state is never ahead of MLflow."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import bare_callback

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("state")).info.run_id
    callback = bare_callback(client, runs={"t1": run_id}, described={"t1"}, tagged={"t1"})
    callback.last_epoch = {run_id: -1}
    real, gate = client.log_batch, threading.Event()

    def slow(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    client.log_batch = slow
    callback.on_trial_result(0, [], _t("t1"), {"epoch": 0, "train_loss": 1.0})
    saved = threading.Event()
    saver = threading.Thread(target=lambda: (callback.get_state(), saved.set()))
    saver.start()
    assert not saved.wait(0.5)  # the epoch is not in MLflow yet: the state save waits
    gate.set()
    assert saved.wait(10)
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [0]
