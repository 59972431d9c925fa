"""A sweep started without ``--address`` runs on a Ray of its own, even when another Ray is already
running on the machine (another sweep, another user's job, a test suite beside this one).

``ray.init()`` without an address joins whatever Ray it finds running locally: one ``.ci/run`` with
other suites beside it failed 4 tests that way (a sweep joined another suite's Ray, whose end then
lost its trials; a test's ``ray.init(num_cpus=2)`` was refused: "When connecting to an existing
cluster, num_cpus and num_gpus must not be provided").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# someone else's Ray, started as tests/test_cluster.py starts one (it leaves its address where
# ray.init() looks): 3 CPUs, up until its stdin closes
_OTHER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""

# what a sweep's driver does with no --address (or the one given as argv[1])
_SWEEP = """
import sys, ray
from sweeps.driver.tuner import init_ray
init_ray(sys.argv[1] if len(sys.argv) > 1 else None)
print(ray.get_runtime_context().gcs_address, int(ray.cluster_resources().get("CPU", 0)), flush=True)
ray.shutdown()
"""


@pytest.fixture
def other_ray():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _OTHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        address = proc.stdout.readline().strip()
        assert address, "the other Ray did not start"
        yield address
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _sweep_driver(*args: str, **env: str) -> tuple[str, int]:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", _SWEEP, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**base, **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    address, cpus = out.stdout.split()
    return address, int(cpus)


def test_a_sweep_without_an_address_does_not_join_a_ray_already_running(other_ray):
    address, _ = _sweep_driver()
    assert address != other_ray  # its own Ray, not the one already running


def test_ray_address_auto_or_an_address_still_join_a_cluster(monkeypatch):
    """Which address reaches ``ray.init``: "local" only when nothing names a cluster."""
    import ray

    from sweeps.driver.tuner import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw["address"]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(None)
    init_ray("")
    init_ray("local")
    init_ray("auto")  # what `sweep submit` runs on the head
    init_ray("10.0.0.5:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")  # Ray's own variable
    init_ray(None)
    init_ray("local")  # asked for by name: local still
    assert calls == ["local", "local", "local", "auto", "10.0.0.5:6379", "10.0.0.7:6379", "local"]
