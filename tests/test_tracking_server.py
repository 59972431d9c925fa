"""The tracking stack for real: ``mlflow/serve.sh`` on PostgreSQL with basic auth, and a sweep logging to it.

PostgreSQL comes from ``.ci/setup.d/postgres.sh`` (CI runs it; locally, as root, run it once). Without a
PostgreSQL install these tests skip, except under ``CI`` where they fail. The fast tests check the
driver's refusals (wrong or missing credentials, database down, server failing) against real sockets.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from glob import glob
from pathlib import Path

import pytest
import requests

from sweeps.driver import run_sweep
from sweeps.tracking.store import check_tracking
from trainer.config import ConfigError

from .conftest import sweep_overrides

ROOT = Path(__file__).resolve().parents[1]
PG_URI = os.environ.get("CXR_TEST_POSTGRES_URI", "postgresql://cxr_test:cxr_test@127.0.0.1:5432/cxr_test")
SETUP = ".ci/setup.d/postgres.sh"
ADMIN, ADMIN_PASSWORD = "admin", "admin-" + secrets.token_hex(8)
USER, PASSWORD = "researcher", "researcher-" + secrets.token_hex(8)


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_running():
    """The sweep here starts a local Ray (as the CLI would); later test modules start their own."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_installed() -> bool:
    return bool(shutil.which("postgres") or glob("/usr/lib/postgresql/*/bin/postgres"))


@pytest.fixture(scope="module")
def pg_admin():
    """An AUTOCOMMIT engine on the test PostgreSQL (skip without PostgreSQL, except under CI)."""
    if not _postgres_installed():
        msg = f"PostgreSQL is not installed: run `sudo bash {SETUP}`"
        if os.environ.get("CI"):
            pytest.fail(f"{msg} (CI must run it before the tests)")
        pytest.skip(msg)
    import sqlalchemy

    admin = sqlalchemy.create_engine(
        PG_URI, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        admin.connect().close()
    except sqlalchemy.exc.OperationalError as e:
        pytest.fail(f"PostgreSQL is installed but {PG_URI} is not usable ({e.orig}): run `sudo bash {SETUP}`")
    yield admin
    admin.dispose()


@contextlib.contextmanager
def _database(admin):
    """A throwaway database; dropped (connections closed) afterwards."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    name = f"cxr_mlflow_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield name, make_url(PG_URI).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _serve_env(backend: str, artifacts: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_BACKEND_STORE_URI=backend,
        MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
        MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,
        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_DB_WAIT_S="10",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def _server(backend: str, work: Path, **extra: str):
    """``mlflow/serve.sh`` on 127.0.0.1: PostgreSQL backend, local artifact directory, basic auth."""
    port = _free_port()
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(
        ["bash", str(ROOT / "mlflow/serve.sh")],
        env=_serve_env(backend, work / "artifacts", port, **extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: uvicorn workers go down with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow/serve.sh exited {proc.returncode}:\n{(work / 'server.log').read_text()[-3000:]}"
                )
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"MLflow server not up in 180 s:\n{(work / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "artifacts": work / "artifacts", "log": work / "server.log"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(pg_admin, tmp_path_factory):
    with _database(pg_admin) as (_, backend), _server(backend, tmp_path_factory.mktemp("mlflow")) as server:
        # a non-admin user: what a researcher would get from the admin
        r = requests.post(
            f"{server['url']}/api/2.0/mlflow/users/create",
            json={"username": USER, "password": PASSWORD},
            auth=(ADMIN, ADMIN_PASSWORD),
            timeout=60,
        )
        assert r.status_code == 200, r.text
        yield server


def _api(server, method: str, endpoint: str, auth=(USER, PASSWORD), **kw) -> requests.Response:
    return requests.request(method, f"{server['url']}/api/2.0/mlflow/{endpoint}", auth=auth, timeout=60, **kw)


@pytest.mark.slow
def test_sweep_logs_runs_metrics_and_artifacts_to_the_server(mlflow_server, ne_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    overrides = sweep_overrides(
        ne_cache,
        tmp_path,
        **{
            "name": "server-sweep",
            "trial.model.backbone": "test_resnet",
            "trial.train.epochs": "2",
            "num_samples": "2",
            "scheduler.type": "fifo",
        },
    )
    outcome = run_sweep(ROOT / "search_spaces/demo.yaml", overrides=overrides)
    assert outcome.tracking_uri == mlflow_server["url"]
    assert [r["state"] for r in outcome.rows] == ["DONE", "DONE"]

    exp = _api(mlflow_server, "GET", "experiments/get-by-name", params={"experiment_name": "server-sweep"})
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment"]["experiment_id"]
    runs = _api(mlflow_server, "POST", "runs/search", json={"experiment_ids": [exp_id], "max_results": 100})
    assert runs.status_code == 200, runs.text
    by_kind: dict[str, list] = {}
    for run in runs.json()["runs"]:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        by_kind.setdefault(tags.get("cxr.kind"), []).append((run, tags))
    (parent, _), children = by_kind["sweep"][0], by_kind["trial"]
    assert len(by_kind["sweep"]) == 1 and len(children) == 2
    assert parent["info"]["status"] == "FINISHED"
    assert {t["mlflow.parentRunId"] for _, t in children} == {parent["info"]["run_id"]}
    assert len({t["ray.trial_id"] for _, t in children}) == 2
    # the sweep ran as the researcher (credentials from the environment): they own the experiment
    mine = requests.get(
        f"{mlflow_server['url']}/api/3.0/mlflow/users/current/permissions", auth=(USER, PASSWORD), timeout=60
    )
    assert mine.status_code == 200, mine.text
    grants = {
        (p["resource_type"], p["resource_pattern"], p["permission"]) for p in mine.json()["permissions"]
    }
    assert ("experiment", exp_id, "MANAGE") in grants, grants
    for run, _ in children:
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert 0.0 <= metrics["best_val_f1_macro"] <= 1.0 and "test_auc" in metrics
        history = _api(
            mlflow_server,
            "GET",
            "metrics/get-history",
            params={"run_id": run_id, "metric_key": "val_f1_macro"},
        )
        assert sorted(m["step"] for m in history.json()["metrics"]) == [0, 1]
        listed = _api(mlflow_server, "GET", "artifacts/list", params={"run_id": run_id}).json()
        assert {f["path"] for f in listed["files"]} >= {"config.resolved.yaml", "plots"}
        plots = _api(
            mlflow_server, "GET", "artifacts/list", params={"run_id": run_id, "path": "plots"}
        ).json()
        assert {Path(f["path"]).name for f in plots["files"]} >= {"roc.png", "confusion_matrix.png"}, plots
        # proxied artifacts: downloadable through the server, stored in its artifacts destination
        root = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")
        got = requests.get(
            f"{mlflow_server['url']}/api/2.0/mlflow-artifacts/artifacts/{root}/config.resolved.yaml",
            auth=(USER, PASSWORD),
            timeout=60,
        )
        assert got.status_code == 200 and "backbone: test_resnet" in got.text
        assert (mlflow_server["artifacts"] / root / "config.resolved.yaml").read_text() == got.text

    # without credentials, or with a wrong password, the server refuses
    for auth in (None, (USER, "wrong-password")):
        refused = _api(mlflow_server, "POST", "runs/search", auth=auth, json={"experiment_ids": [exp_id]})
        assert refused.status_code == 401, refused.text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("user", "password", "expected"),
    [
        (USER, "wrong-password", "refused the credentials of user 'researcher'"),
        (None, None, "requires a login"),
    ],
)
def test_wrong_or_missing_credentials_fail_fast(
    mlflow_server, ne_cache, tmp_path, monkeypatch, user, password, expected
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    for var, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        monkeypatch.setenv(var, value) if value else monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    overrides = sweep_overrides(
        ne_cache, tmp_path, **{"name": "refused", "trial.model.backbone": "test_resnet"}
    )
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=expected) as err:
        run_sweep(ROOT / "search_spaces/demo.yaml", overrides=overrides)
    assert time.monotonic() - t0 < 20  # one request, not MLflow's minutes of retries
    assert "MLFLOW_TRACKING_USERNAME" in str(err.value) and "MLFLOW_TRACKING_PASSWORD" in str(err.value)
    assert not (tmp_path / "refused").exists()  # nothing started, nothing half-written


class _FakeServer(http.server.ThreadingHTTPServer):
    """An HTTP server answering every request with one status; counts requests (to prove no retries)."""

    def __init__(self, status: int, body: dict):
        self.requests = 0
        status_, payload = status, json.dumps(body).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):
                self.requests += 1
                handler.send_response(status_)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(payload)))
                handler.end_headers()
                handler.wfile.write(payload)

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, {"error_code": "UNAUTHENTICATED"}, "refused the credentials of user 'someone'"),
        (403, {"error_code": "PERMISSION_DENIED"}, "denies user 'someone' \\(HTTP 403\\)"),
        (503, {"message": "(psycopg.OperationalError) connection refused"}, "up but failing \\(HTTP 503"),
    ],
)
def test_tracking_server_refusals_are_one_request_and_a_clear_error(status, body, expected, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    server = _FakeServer(status, body)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=expected) as err:
            check_tracking(server.url)
        assert time.monotonic() - t0 < 5 and server.requests == 1  # no retry storm
        if status == 503:
            assert "psycopg.OperationalError" in str(err.value) and "PostgreSQL" in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


def test_tracking_server_down_and_database_down_fail_in_seconds():
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="is unreachable"):
        check_tracking(f"http://127.0.0.1:{port}")
    with pytest.raises(
        ConfigError, match=f"database postgresql://cxr:\\*\\*\\*@127.0.0.1:{port}/mlflow is not"
    ):
        check_tracking(f"postgresql://cxr:hunter2@127.0.0.1:{port}/mlflow")
    assert time.monotonic() - t0 < 15


def test_serve_script_names_a_missing_setting_and_an_unreachable_database(tmp_path):
    env = _serve_env("postgresql://cxr:hunter2@127.0.0.1:1/mlflow", tmp_path / "art", _free_port())
    env["MLFLOW_DB_WAIT_S"] = "0"
    out = subprocess.run(["bash", str(ROOT / "mlflow/serve.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert "MLFLOW_BACKEND_STORE_URI: cannot connect to postgresql://cxr:***@127.0.0.1:1/mlflow" in out.stderr
    assert "hunter2" not in out.stderr  # the password is never printed
    del env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    out = subprocess.run(["bash", str(ROOT / "mlflow/serve.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "MLFLOW_FLASK_SERVER_SECRET_KEY is not set" in out.stderr


@pytest.mark.slow
def test_server_whose_database_went_away_is_refused_in_one_request(pg_admin, tmp_path, monkeypatch):
    import sqlalchemy

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    with _database(pg_admin) as (name, backend), _server(backend, tmp_path) as server:
        check_tracking(server["url"])  # up: passes
        with pg_admin.connect() as c:  # the backend store disappears under the running server
            c.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="is up but failing \\(HTTP 5") as err:
            check_tracking(server["url"])
        assert time.monotonic() - t0 < 5  # one request, no retries
        assert "OperationalError" in str(err.value) and "PostgreSQL" in str(err.value)


@pytest.mark.slow
def test_server_on_s3_creates_its_bucket_and_keeps_artifacts_there(pg_admin, tmp_path, monkeypatch):
    """The compose topology (MinIO) with an S3 endpoint from moto: bucket made at start, artifacts in it."""
    import boto3
    from mlflow.tracking import MlflowClient
    from moto.server import ThreadedMotoServer

    s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3_server.start()
    try:
        endpoint = "http://{}:{}".format(*s3_server.get_host_and_port())
        keys = {"AWS_ACCESS_KEY_ID": "cxr-test-key", "AWS_SECRET_ACCESS_KEY": "cxr-test-secret"}
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        )
        assert not s3.list_buckets().get("Buckets")
        s3_env = {
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://cxr-artifacts/mlflow",
            "MLFLOW_CREATE_BUCKET": "true",
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            **keys,
        }
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        with _database(pg_admin) as (_, backend), _server(backend, tmp_path, **s3_env) as server:
            assert "created bucket cxr-artifacts" in server["log"].read_text()
            client = MlflowClient(server["url"])
            run = client.create_run(client.create_experiment("s3-artifacts"))
            (tmp_path / "config.resolved.yaml").write_text("model: {backbone: test_resnet}\n")
            client.log_artifact(run.info.run_id, str(tmp_path / "config.resolved.yaml"))
            stored = [o["Key"] for o in s3.list_objects_v2(Bucket="cxr-artifacts").get("Contents", [])]
            assert stored == [
                f"mlflow/{run.info.experiment_id}/{run.info.run_id}/artifacts/config.resolved.yaml"
            ]
            assert not (tmp_path / "artifacts").exists()  # nothing went to a local directory
    finally:
        s3_server.stop()


@pytest.mark.slow
def test_user_without_write_permission_is_refused_before_any_trial(
    mlflow_server, ne_cache, tmp_path, monkeypatch
):
    # the admin owns the experiment; the researcher may read it (default READ) but not add runs
    made = _api(
        mlflow_server, "POST", "experiments/create", auth=(ADMIN, ADMIN_PASSWORD), json={"name": "owned"}
    )
    assert made.status_code == 200, made.text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    overrides = sweep_overrides(
        ne_cache, tmp_path, **{"name": "owned", "trial.model.backbone": "test_resnet"}
    )
    with pytest.raises(
        ConfigError, match="refused to record the sweep in experiment 'owned' \\(PERMISSION_DENIED\\)"
    ):
        run_sweep(ROOT / "search_spaces/demo.yaml", overrides=overrides)
    assert not (tmp_path / "owned").exists()
    runs = _api(
        mlflow_server,
        "POST",
        "runs/search",
        auth=(ADMIN, ADMIN_PASSWORD),
        json={"experiment_ids": [made.json()["experiment_id"]]},
    )
    assert runs.json().get("runs", []) == []  # no parent run was half-made
