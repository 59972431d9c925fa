"""Fault injection on real sweeps: trial workers killed mid-epoch, the driver killed, a diverging trial.

Each test runs a small sweep of tiny models on this machine (Ray local, MLflow on sqlite) and
checks that nothing is lost: every trial finishes (or fails for its own reason), MLflow holds
exactly one run per trial, none left RUNNING, and no epoch is logged twice.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import assert_one_run_per_trial_and_no_duplicate_epochs, sweep_overrides, sweep_runs

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "search_spaces" / "demo.yaml"
CLI = [sys.executable, "-c", "from sweeps.cli import app; app()"]
pytestmark = pytest.mark.slow


def _trial_workers() -> list[int]:
    """PIDs of Ray processes running a trial (their title names the trainable)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") and ("sweep_trainable" in cmd or "ImplicitFunc" in cmd):
            pids.append(int(entry.name))
    return pids


def _sets(cache: Path, storage: Path, **extra: str) -> list[str]:
    # Ray's own random search (the demo's λ = 1 first point would put it on Optuna's RandomSampler)
    base = {"scheduler.type": "fifo", "search.algorithm": "random", "trial.model.backbone": "test_resnet"}
    base["search.points_to_evaluate"] = "[]"
    return sweep_overrides(cache, storage, **{**base, **extra})


def test_trial_workers_killed_mid_epoch_resume_from_their_checkpoints(ne_cache, tmp_path):
    """Five SIGKILLs of trial worker processes during one sweep: every trial still finishes."""
    import ray

    from sweeps.driver import run_sweep

    kills: list[int] = []
    done = threading.Event()

    def killer() -> None:
        while len(kills) < 5 and not done.is_set():
            time.sleep(2.5)  # mid-epoch: an epoch of this trial takes a few seconds here
            pids = _trial_workers()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                kills.append(pids[0])

    sets = _sets(ne_cache, tmp_path, num_samples="3", max_failures="6", **{"trial.train.epochs": "6"})
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    thread = threading.Thread(target=killer, daemon=True)
    try:
        thread.start()
        outcome = run_sweep(DEMO, overrides=sets)
    finally:
        done.set()
        thread.join()
        ray.shutdown()
    print(f"killed {len(kills)} trial workers; states {[r['state'] for r in outcome.rows]}")
    assert len(kills) >= 5
    assert [r["state"] for r in outcome.rows] == ["DONE"] * 3
    assert_one_run_per_trial_and_no_duplicate_epochs(tmp_path, 3)
    client, _, children = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    for r in children:  # every epoch's metrics arrived, and the summaries
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss"))
        assert steps == list(
            range(int(r.data.metrics["epochs_run"]))
        )  # (early stopping may end it sooner) and "test_f1_macro" in r.data.metrics


def _finished_children(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute(
                "SELECT COUNT(*) FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                "WHERE t.key = 'cxr.kind' AND t.value = 'trial' AND r.status = 'FINISHED'"
            ).fetchone()
        return int(row[0])
    except sqlite3.Error:
        return 0


def test_driver_killed_mid_sweep_is_finished_by_resume(ne_cache, tmp_path):
    sets = _sets(ne_cache, tmp_path, num_samples="4", **{"trial.train.epochs": "3"})
    args = [*CLI, "sweep", "run", str(DEMO), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    driver = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while _finished_children(tmp_path / "mlflow.db") < 1:
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in 5 minutes"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started: a crashed head
    driver.wait()
    before = _finished_children(tmp_path / "mlflow.db")
    client, _, children = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    finished_before = {
        r.data.tags["ray.trial_id"]: r.info.end_time for r in children if r.info.status == "FINISHED"
    }
    resume = subprocess.run(
        [*CLI, "sweep", "resume", "demo", "--storage", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    print(f"{before} trial(s) finished before the kill")
    assert_one_run_per_trial_and_no_duplicate_epochs(tmp_path, 4)
    client, _, children = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    assert all(r.info.status == "FINISHED" for r in children)
    for r in children:  # finished trials were not run again
        tid = r.data.tags["ray.trial_id"]
        if tid in finished_before:
            assert r.info.end_time == finished_before[tid]
    status = subprocess.run(
        [*CLI, "sweep", "status", "demo", "--storage", str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert status.returncode == 0 and status.stdout.count("DONE") == 4
    # counts reconcile: trials = child runs = rows of `cxr-sweep best --top all`
    best = subprocess.run(
        [*CLI, "best", "demo", "--storage", str(tmp_path), "--top", "all", "--json", "--include-stopped"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert best.returncode == 0, best.stdout + best.stderr
    rows = json.loads(best.stdout)
    assert len(rows) == len(children) == 4
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in children}


def test_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(ne_cache, tmp_path):
    import ray

    from sweeps.driver import run_sweep

    # every Ray worker poisons the attention loss of trials with threshold 0.7 (tests/reliability/_inject.py)
    space = tmp_path / "diverge.yaml"
    space.write_text(
        f"""
name: demo
trial:
  data: {{cache: {ne_cache}, task: ne}}
  model: {{backbone: test_resnet, image_size: 64}}
  train: {{epochs: 2, batch_size: 32}}
  attention: {{lambda: 0.5, mode: soft, tau: 0.1, cam_target: label}}
params:
  attention.threshold: {{type: grid, values: [0.5, 0.7]}}
search: {{algorithm: grid}}
scheduler: {{type: fifo}}
num_samples: 1
resources: {{cpu: 1, gpu: 0}}
max_concurrent_trials: 2
max_failures: 1
storage_path: {tmp_path}
"""
    )
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    hook = "tests.reliability._inject.nan_loss_when_threshold_is_07"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": hook},
    )
    try:
        outcome = run_sweep(space)
    finally:
        ray.shutdown()
    states = sorted(r["state"] for r in outcome.rows)
    assert states == ["DONE", "ERROR"]
    client, parents, children = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["error_type"] == "TrialDiverged"
    assert "non-finite training loss" in failed[0].data.tags["error"]
    assert parents[0].data.metrics["trials_failed"] == 1
