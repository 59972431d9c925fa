"""The compose stack for real (``make stack-test``): the images built from ``docker/Dockerfile``, the
services of ``docker/compose.yaml`` brought up, a sweep run inside them, faults injected, the model
exported inside and used on the host, and ``down -v`` leaving nothing behind.

The stack is the shipped compose file with what this machine cannot have replaced, nothing else
(:func:`derive_compose`): the two images no registry here serves (``postgres``, ``minio``) by the
stand-ins of ``tests/stack/Dockerfile``, the worker's GPU reservation dropped (no GPU, no NVIDIA
runtime), ports on free 127.0.0.1 ports, and the Ray head given no CPUs so that trials run on the
worker, whose loss the fault test is about.

Needs a Docker daemon (``.ci/setup.d/docker.sh`` installs and starts one); without one every test
here is skipped with the reason. Build settings for this machine (base image, CA bundle, package
mirror: ``docker/build.sh``) come from the file ``.ci/setup.d/docker.sh`` writes, named by
``CXR_DOCKER_BUILD_ENV``.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILD_ENV = Path(os.environ.get("CXR_DOCKER_BUILD_ENV", "/etc/cxr-attention-sweeps/docker-build.env"))
PROJECT = f"cxrtest{os.getpid()}"
SWEEP = "stack-sweep"
EPOCHS = 8  # an epoch takes ~1.5 s here: eight give the fault test a window to hit a trial in
TRIALS = 4
ADMIN, USER = "admin", "sweeps"

pytestmark = [pytest.mark.slow, pytest.mark.docker]


def build_env() -> dict[str, str]:
    """The machine's image-build settings (KEY=VALUE lines in sh syntax), over the environment."""
    env = dict(os.environ)
    if BUILD_ENV.is_file():
        for line in BUILD_ENV.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                env[key] = " ".join(shlex.split(value))
    return env


def docker_cli(env: dict[str, str]) -> str:
    return env.get("DOCKER") or shutil.which("docker") or "docker"


def compose_cli(env: dict[str, str]) -> list[str]:
    """Compose v2 (`docker compose`) where the client has it, else the v1 `docker-compose`."""
    docker = docker_cli(env)
    for cmd in ([docker, "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except FileNotFoundError:
            continue
    pytest.fail("no Docker Compose: neither `docker compose` nor `docker-compose` runs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def derive_compose(shipped: dict, ports: dict[str, int], images: dict[str, str]) -> dict:
    """The shipped stack with only what this machine cannot have replaced (see the module docstring)."""
    stack = json.loads(json.dumps(shipped))
    stack.pop("name", None)  # compose v1 has no top-level name; the project name is given with -p
    services = stack["services"]
    for service in services.values():
        service.pop("build", None)  # images are built first, with docker/build.sh
    services["postgres"]["image"] = images["postgres"]
    s3 = services["minio"]
    s3["image"] = images["s3"]
    for key in ("command", "environment", "volumes"):
        s3.pop(key, None)
    s3["ports"] = [f"127.0.0.1:{ports['s3']}:9000"]
    probe = "import urllib.request; urllib.request.urlopen('http://localhost:9000/moto-api/')"
    s3["healthcheck"] = {"test": ["CMD", "python", "-c", probe], "interval": "2s", "retries": 30}
    for name in ("postgres", "mlflow"):  # polled more often, as long in all (MLflow's first start migrates)
        check = services[name]["healthcheck"]
        check["retries"] = check["retries"] * int(check["interval"].rstrip("s")) // 2
        check["interval"] = "2s"
    services["ray-head"]["command"] = services["ray-head"]["command"].replace(
        "--num-gpus=0", "--num-gpus=0 --num-cpus=0"
    )
    services["ray-worker"].pop("deploy")
    stack["volumes"].pop("minio")
    return stack


class Stack:
    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = workdir
        self.env = env
        self.docker = docker_cli(env)
        self.compose_cmd = compose_cli(env)
        self.ports = {k: free_port() for k in ("mlflow", "dashboard", "client", "s3")}
        self.passwords = {k: secrets.token_hex(12) for k in ("postgres", "admin", "user", "s3")}
        self.ray_token = secrets.token_hex(32)
        self.file = workdir / "compose.yaml"
        self.env_file = workdir / ".env"
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    def write(self, images: dict[str, str]) -> None:
        shipped = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
        self.file.write_text(yaml.safe_dump(derive_compose(shipped, self.ports, images), sort_keys=False))
        values = {
            "POSTGRES_USER": "mlflow",
            "POSTGRES_PASSWORD": self.passwords["postgres"],
            "POSTGRES_DB": "mlflow",
            "MINIO_ROOT_USER": "stack-test",
            "MINIO_ROOT_PASSWORD": self.passwords["s3"],
            "MINIO_BUCKET": "mlflow",
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.passwords["admin"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            "MLFLOW_AUTH_DEFAULT_PERMISSION": "READ",
            "MLFLOW_TRACKING_USERNAME": USER,
            "MLFLOW_TRACKING_PASSWORD": self.passwords["user"],
            "MLFLOW_WORKERS": "2",
            "CXR_DATA_DIR": str(self.workdir / "data"),
            "MLFLOW_PORT": str(self.ports["mlflow"]),
            "RAY_DASHBOARD_PORT": str(self.ports["dashboard"]),
            "RAY_CLIENT_PORT": str(self.ports["client"]),
            "RAY_AUTH_TOKEN": self.ray_token,
            "CXR_IMAGE": images["worker"],
            "CXR_MLFLOW_IMAGE": images["mlflow"],
        }
        (self.workdir / "data").mkdir(exist_ok=True)
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True, **kw
    ) -> subprocess.CompletedProcess:
        cmd = [
            *self.compose_cmd,
            "-p",
            PROJECT,
            "-f",
            str(self.file),
            "--env-file",
            str(self.env_file),
            *args,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.workdir, **kw)
        if check and out.returncode != 0:
            pytest.fail(
                f"{' '.join(args[:3])}: exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
            )
        return out

    def exec(
        self, service: str, *cmd: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", service, *cmd, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        cid = self.container(service)
        if not cid:
            return "absent"
        fmt = "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
        out = subprocess.run([self.docker, "inspect", "-f", fmt, cid], capture_output=True, text=True)
        return out.stdout.strip() or "absent"

    def wait_healthy(self, services: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {s: self.health(s) for s in services}
            if all(v == "healthy" for v in states.values()):
                return
            time.sleep(2)
        logs = self.compose("logs", "--tail", "40", check=False).stdout
        pytest.fail(f"services not healthy after {timeout:.0f} s: {states}\n{logs[-6000:]}")

    def ray_nodes(self) -> int:
        code = (
            "import ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(len([n for n in ray.nodes() if n['Alive']]))"
        )
        out = self.exec("ray-head", "python", "-c", code, check=False, timeout=120)
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def wait_nodes(self, n: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.ray_nodes() != n:
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray cluster did not reach {n} nodes in {timeout:.0f} s")
            time.sleep(3)

    def api(self, method: str, endpoint: str, auth=None, **kw) -> requests.Response:
        auth = (USER, self.passwords["user"]) if auth is None else auth
        return requests.request(
            method, f"{self.url}/api/2.0/mlflow/{endpoint}", auth=auth or None, timeout=60, **kw
        )

    def runs(self, sweep: str = SWEEP) -> list[dict]:
        exp = self.api("GET", "experiments/get-by-name", params={"experiment_name": sweep})
        if exp.status_code != 200:
            return []
        body = {"experiment_ids": [exp.json()["experiment"]["experiment_id"]], "max_results": 1000}
        return self.api("POST", "runs/search", json=body).json().get("runs", [])


def build_images(env: dict[str, str]) -> dict[str, str]:
    """Both project images (docker/build.sh), then the test's stand-ins on top of them."""
    # fixed tags, kept after the test: the next run (CI on the same machine) rebuilds only what changed
    images = {k: f"cxr-stack-test/{k}:latest" for k in ("worker", "mlflow", "postgres", "s3")}
    runs = [
        ({}, [f"mlflow={images['mlflow']}", f"worker={images['worker']}"]),
        (
            {"DOCKERFILE": "tests/stack/Dockerfile", "BUILD_ARGS": f"MLFLOW_IMAGE={images['mlflow']}"},
            [f"postgres={images['postgres']}", f"s3={images['s3']}"],
        ),
    ]
    for extra, targets in runs:
        cmd = ["bash", "docker/build.sh", *targets]
        out = subprocess.run(
            cmd, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=3000
        )
        assert out.returncode == 0, (
            f"{' '.join(cmd)}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
        )
    return images


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = build_env()
    try:
        info = subprocess.run([docker_cli(env), "info"], capture_output=True, text=True, timeout=60)
        why = None if info.returncode == 0 else (info.stderr.strip().splitlines() or ["no answer"])[-1]
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        why = f"{type(e).__name__}: {e}"
    if why:
        pytest.skip(f"no Docker daemon answers ({why}); .ci/setup.d/docker.sh installs and starts one")
    st = Stack(tmp_path_factory.mktemp("stack"), env)
    start = time.monotonic()
    st.images = build_images(env)
    st.timings["build_s"] = time.monotonic() - start
    st.write(st.images)
    try:
        start = time.monotonic()
        up = st.compose("up", "-d", check=False)
        if up.returncode != 0:
            logs = st.compose("logs", "--tail", "30", check=False).stdout
            pytest.fail(f"compose up: exit {up.returncode}\n{up.stderr[-3000:]}\n{logs[-8000:]}")
        st.wait_healthy(["postgres", "minio", "mlflow"])
        st.wait_nodes(2)
        st.timings["up_to_healthy_s"] = time.monotonic() - start
        created = st.api(
            "POST",
            "users/create",
            auth=(ADMIN, st.passwords["admin"]),
            json={"username": USER, "password": st.passwords["user"]},
        )
        assert created.status_code == 200, created.text
        yield st
    finally:
        st.compose("down", "-v", "--remove-orphans", check=False)
        report = os.environ.get("CXR_STACK_TIMINGS")
        if report:
            Path(report).write_text(json.dumps(st.timings, indent=2) + "\n")
        print(f"stack timings: {st.timings}")


# the first test also pays for the stack fixture: a cold build of the four images (8.5 min in CI), then up
@pytest.mark.timeout(2700)
def test_the_images_are_what_they_claim(stack):
    run = [stack.docker, "run", "--rm"]
    worker, mlflow = stack.images["worker"], stack.images["mlflow"]
    for image in (worker, mlflow):
        uid = subprocess.run([*run, image, "id", "-u"], capture_output=True, text=True, timeout=120)
        assert uid.stdout.strip() == "1000", (
            f"{image} runs as uid {uid.stdout.strip()!r}, not the non-root 1000"
        )
    help_ = subprocess.run([*run, worker], capture_output=True, text=True, timeout=120)  # the default command
    assert help_.returncode == 0 and "sweep" in help_.stdout, help_.stdout + help_.stderr
    probe = "import torch, trainer, sweeps; print(torch.__version__, torch.cuda.is_available())"
    torch_ = subprocess.run(
        [*run, worker, "python", "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert torch_.returncode == 0 and torch_.stdout.startswith("2.14.1"), torch_.stderr
    if os.environ.get("CXR_STACK_GPU") == "1":  # a GPU host with the NVIDIA runtime
        gpu = subprocess.run(
            [*run, "--gpus", "all", worker, "python", "-c", probe], capture_output=True, text=True
        )
        assert gpu.stdout.split()[-1] == "True", gpu.stdout + gpu.stderr
    version = subprocess.run(
        [*run, mlflow, "mlflow", "--version"], capture_output=True, text=True, timeout=120
    )
    assert "3.17.2" in version.stdout, version.stdout + version.stderr
    no_torch = subprocess.run(
        [*run, mlflow, "python", "-c", "import torch"], capture_output=True, timeout=120
    )
    assert no_torch.returncode != 0  # the tracking server's image stays small


def _children(stack: Stack, sweep: str = SWEEP) -> list[dict]:
    return [r for r in stack.runs(sweep) if _tags(r).get("cxr.kind") == "trial"]


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _history(stack: Stack, run_id: str, key: str = "train_loss") -> list[int]:
    got = stack.api("GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key})
    return sorted(m["step"] for m in got.json().get("metrics", []))


def _wait(what: str, check, timeout: float, every: float = 2.0, explain=None):
    """Poll `check` until it returns something true; on timeout fail with what `explain()` says."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen in {timeout:.0f} s" + (f"\n{explain()}" if explain else ""))
        time.sleep(every)


def _explain(stack: Stack, log: Path):
    """What the sweep and the cluster were doing: the driver's log, Ray's view, the containers."""

    def explain() -> str:
        status = stack.exec("ray-head", "ray", "status", check=False, timeout=120)
        nodes = stack.exec(
            "ray-head", "python", "-c",
            "import ray; ray.init(address='auto', logging_level='ERROR');"
            "[print(n['NodeID'][:8], n['NodeManagerAddress'], n['Alive'], n['Resources'])"
            " for n in ray.nodes()]",
            check=False, timeout=120,
        )  # fmt: skip
        ps = stack.compose("ps", "-a", check=False)
        tail = log.read_text(errors="replace")[-6000:] if log.exists() else "(no log)"
        return "\n".join([
            "--- driver log (tail)", tail, "--- ray status", status.stdout + status.stderr,
            "--- ray nodes", nodes.stdout + nodes.stderr[-2000:], "--- compose ps", ps.stdout,
        ])  # fmt: skip

    return explain


def sweep_cmd(name: str, trials: int) -> list[str]:
    args = [a for k, v in sweep_sets(name, trials).items() for a in ("--set", f"{k}={v}")]
    return ["cxr-sweep", "sweep", "run", "/opt/cxr/search_spaces/demo.yaml", "--address", "auto", *args]


def sweep_sets(name: str, trials: int, epochs: int = EPOCHS) -> dict[str, str]:
    return {
        "name": name,
        "storage_path": "/shared/sweeps",
        "trial.data.cache": "/shared/data/cache/ne",
        "trial.model.backbone": "test_resnet",
        "trial.train.epochs": str(epochs),
        "trial.train.early_stop_patience": str(epochs),  # every epoch trained: the history check is exact
        "num_samples": str(trials),
        "scheduler.type": "fifo",  # every trial trains every epoch: the history check below is exact
        "max_failures": "3",
    }


def _saved_epochs(stack: Stack, name: str) -> dict[str, int]:
    """Per trial folder, the epochs its checkpoints hold (the newest's index + 1), on the shared volume."""
    code = (
        "import json, pathlib\n"
        "saved = {}\n"
        f"for p in pathlib.Path('/shared/sweeps/{name}').glob('*/checkpoint_*'):\n"
        "    saved[p.parent.name] = max(saved.get(p.parent.name, 0), int(p.name.rsplit('_', 1)[1]) + 1)\n"
        "print(json.dumps(saved))"
    )
    out = stack.exec("ray-head", "python", "-c", code, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _restored_trials(stack: Stack, name: str) -> dict[str, list[tuple[int, int]]]:
    """Per trial folder, Tune's (iterations_since_restore, epochs_done) rows in result.json."""
    code = (
        "import json, pathlib, sys\n"
        f"rows = {{p.parent.name: [(r['iterations_since_restore'], r['epochs_done']) "
        f"for r in map(json.loads, p.read_text().splitlines()) if r] "
        f"for p in pathlib.Path('/shared/sweeps/{name}').glob('*/result.json')}}\n"
        "print(json.dumps(rows))"
    )
    out = stack.exec("ray-head", "python", "-c", code)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_sweep(stack: Stack, name: str, trials: int, epochs: int = EPOCHS) -> list[dict]:
    """One finished parent, one finished run per trial, each epoch logged exactly once."""
    runs = stack.runs(name)
    parents = [r for r in runs if _tags(r).get("cxr.kind") == "sweep"]
    children = [r for r in runs if _tags(r).get("cxr.kind") == "trial"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED", [p["info"] for p in parents]
    assert len(children) == trials, [c["info"]["run_name"] for c in children]
    assert len({_tags(c)["ray.trial_id"] for c in children}) == trials
    for child in children:
        assert child["info"]["status"] == "FINISHED", child["info"]
        assert _tags(child)["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
        assert _history(stack, child["info"]["run_id"]) == list(range(epochs)), child["info"]["run_name"]
    return children


@pytest.fixture(scope="module")
def phantoms(stack):
    """Phantoms and their dataset cache, written inside the stack (on the shared volume)."""
    stack.exec(
        "ray-head", "cxr-sweep", "phantoms", "--out", "/shared/data/phantoms", "--task", "ne",
        "--patients", "80", "--size", "64", "--cache", "/shared/data/cache/ne",
    )  # fmt: skip
    return "/shared/data/cache/ne"


def test_a_sweep_in_the_stack_survives_a_lost_worker_and_a_tracking_server_restart(stack, phantoms):
    log = (stack.workdir / "sweep.log").open("w")
    cmd = [*stack.compose_cmd, "-p", PROJECT, "-f", str(stack.file), "--env-file", str(stack.env_file)]
    start = time.monotonic()
    driver = subprocess.Popen(
        [*cmd, "exec", "-T", "ray-head", *sweep_cmd(SWEEP, TRIALS)], stdout=log, stderr=log
    )
    try:
        # mid-sweep: a trial has saved two epochs and has three to go. Saved, as the worker sees it: its
        # checkpoint folders on the shared volume. MLflow lags behind the worker (the driver logs results
        # as they reach it, ~100 values each), so a trial MLflow shows at epoch 2 may already have trained
        # its last: killed then, nothing was left to resume (CI waited 600 s for an epoch that never came)
        explain = _explain(stack, stack.workdir / "sweep.log")

        def trial_at_epoch_2():
            if driver.poll() is not None:
                pytest.fail("the sweep ended before any trial was hit:\n" + explain())
            return sorted(f for f, saved in _saved_epochs(stack, SWEEP).items() if 2 <= saved <= EPOCHS - 3)

        hit = _wait("a trial with two epochs saved", trial_at_epoch_2, 600, every=0.5, explain=explain)
        worker = stack.container("ray-worker")
        subprocess.run([stack.docker, "kill", worker], check=True, capture_output=True)
        killed_at = time.monotonic()
        time.sleep(3)
        if stack.health("ray-worker") != "running":
            stack.compose("start", "ray-worker")  # as an operator would; a restart policy may already have
        stack.wait_nodes(2)
        rejoined_s = time.monotonic() - killed_at
        # more epochs after the loss, then the tracking server restarts under the running sweep
        logged = sum(len(_history(stack, c["info"]["run_id"])) for c in _children(stack))
        _wait(
            "training after the worker rejoined",
            lambda: sum(len(_history(stack, c["info"]["run_id"])) for c in _children(stack)) > logged,
            timeout=600,
            explain=explain,
        )
        stack.compose("restart", "mlflow")
        stack.wait_healthy(["mlflow"])
        assert driver.wait(timeout=1200) == 0, (stack.workdir / "sweep.log").read_text()[-6000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    stack.timings["sweep_in_stack_s"] = time.monotonic() - start
    stack.timings["worker_rejoined_s"] = rejoined_s

    children = _check_sweep(stack, SWEEP, TRIALS)
    # the trial hit by the loss went on from its checkpoint: Tune's rows restart their count past epoch 1
    rows = _restored_trials(stack, SWEEP)
    for folder, trial_rows in rows.items():
        if folder not in hit:
            continue
        # a (re)start is a row with iterations_since_restore 1; the restored one begins past epoch 1
        starts = [done for since, done in trial_rows if since == 1]
        assert len(starts) >= 2 and all(done > 1 for done in starts[1:]), (folder, trial_rows)
        assert trial_rows[-1][1] == EPOCHS, (folder, trial_rows)
    assert set(hit) <= set(rows), (hit, list(rows))

    # PostgreSQL holds the runs; S3 the artifacts; the server refuses anyone without a login
    sql = f"SELECT count(*) FROM runs r JOIN experiments e USING (experiment_id) WHERE e.name = '{SWEEP}'"
    count = stack.exec("postgres", "psql", "-U", "mlflow", "-d", "mlflow", "-tAc", sql).stdout.strip()
    assert int(count) == TRIALS + 1
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{stack.ports['s3']}",
        aws_access_key_id="stack-test",
        aws_secret_access_key=stack.passwords["s3"],
        region_name="us-east-1",
    )
    keys = {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
        for o in page.get("Contents", [])
    }
    for child in children:
        root = child["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/").strip("/")
        assert f"{root}/config.resolved.yaml" in keys, (root, sorted(keys)[:20])
    exp_id = children[0]["info"]["experiment_id"]
    for auth in (False, (USER, "wrong-password")):
        refused = stack.api("POST", "runs/search", auth=auth, json={"experiment_ids": [exp_id]})
        assert refused.status_code == 401, refused.text


def test_a_submitted_sweep_stopped_then_cut_by_a_head_restart_is_finished_by_resume(stack, phantoms):
    """From the host through Ray's Jobs API (token auth): submit, status, stop as a Ctrl-C, logs; then
    `sweep resume` on the head, cut short by a restart of the head container, and resumed again."""
    name = "stack-submitted"
    address = f"http://127.0.0.1:{stack.ports['dashboard']}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": stack.ray_token}
    cli = str(Path(sys.executable).with_name("cxr-sweep"))

    def host(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run([cli, "sweep", *args], capture_output=True, text=True, env=env, timeout=timeout)
        assert out.returncode == 0, f"sweep {args[0]}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
        return out

    def epochs_logged() -> int:
        return sum(len(_history(stack, c["info"]["run_id"])) for c in _children(stack, name))

    # long enough to be stopped, resumed and cut again before it ends. With 10 epochs a trial, one CI
    # run (a faster CPU, other suites beside it) logged all 20 before the stop came, in the ~10 s that
    # `status` and `stop` take from the host
    epochs = 30
    sets = [a for k, v in sweep_sets(name, 2, epochs).items() for a in ("--set", f"{k}={v}")]
    start = time.monotonic()
    submitted = host("submit", str(ROOT / "search_spaces/demo.yaml"), "--address", address, *sets)
    assert f"submitted sweep {name} as job cxr-sweep-{name}-" in submitted.stdout
    _wait("an epoch of the submitted sweep", lambda: epochs_logged() > 0, timeout=600)
    assert " RUNNING" in host("status", name, "--address", address).stdout.splitlines()[0]
    host("stop", name, "--address", address)
    _wait("the job stopped", lambda: "STOPPED" in host("status", name, "--address", address).stdout, 300)
    log = host("logs", name, "--address", address).stdout
    assert epochs_logged() < 2 * epochs, "the stop came after the sweep's end: nothing left to resume"
    assert f"interrupted: continue with cxr-sweep sweep resume {name}" in " ".join(log.split()), log[-3000:]

    # resume on the head; the head container restarts under it (its driver and Ray's GCS with it)
    resume = ["cxr-sweep", "sweep", "resume", name, "--storage", "/shared/sweeps", "--address", "auto"]
    cmd = [*stack.compose_cmd, "-p", PROJECT, "-f", str(stack.file), "--env-file", str(stack.env_file)]
    before = epochs_logged()
    log = (stack.workdir / "resume.log").open("w")
    driver = subprocess.Popen([*cmd, "exec", "-T", "ray-head", *resume], stdout=log, stderr=log)
    try:
        _wait(
            "an epoch after the resume", lambda: epochs_logged() > before, timeout=600,
            explain=_explain(stack, stack.workdir / "resume.log"),
        )  # fmt: skip
        stack.compose("restart", "ray-head")
        assert driver.wait(timeout=120) != 0
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    stack.wait_nodes(2, timeout=300)  # the worker lost its head: its container restarts and rejoins
    done = stack.exec("ray-head", *resume, timeout=1200)
    stack.timings["submitted_stopped_cut_resumed_s"] = time.monotonic() - start
    assert f"sweep {name}: 2 done" in done.stdout, done.stdout[-3000:]
    _check_sweep(stack, name, 2, epochs)


def test_export_inside_the_stack_and_predict_on_the_host(stack, tmp_path):
    if not _children(stack):
        pytest.skip("needs the sweep of the test before")
    stack.exec("ray-head", "cxr-sweep", "export", SWEEP, "--out", "/shared/export", timeout=900)
    head = stack.container("ray-head")
    for src, dst in (
        ("/shared/export", tmp_path / "export"),
        ("/shared/data/phantoms/images", tmp_path / "images"),
    ):
        subprocess.run([stack.docker, "cp", f"{head}:{src}", str(dst)], check=True, capture_output=True)
    card = (tmp_path / "export" / "model_card.md").read_text()
    assert f"sweep `{SWEEP}`" in card, card[:1000]
    assert any(f"MLflow run `{c['info']['run_id']}`" in card for c in _children(stack)), card[:1000]
    cli = Path(sys.executable).with_name("cxr-sweep")  # the host's install, not the image's
    out = subprocess.run(
        [str(cli), "predict", "--model", str(tmp_path / "export"), "--images", str(tmp_path / "images"),
         "--out", str(tmp_path / "pred"), "--no-cam"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    import pandas as pd

    pred = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert len(pred) == len(list((tmp_path / "images").rglob("*.png"))) > 0


def test_compose_down_leaves_nothing_behind(stack):
    stack.compose("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
        left = subprocess.run([stack.docker, *kind, "-q", "--filter", label], capture_output=True, text=True)
        assert left.stdout.strip() == "", f"docker {' '.join(kind)}: {left.stdout}"
