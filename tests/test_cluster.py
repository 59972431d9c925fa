"""A simulated multi-node Ray cluster (ray.cluster_utils.Cluster) with fake GPUs."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.driver import run_sweep
from trainer.config import ConfigError

from .conftest import peak_trials_per_gpu, sweep_overrides, sweep_runs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture
def two_gpu_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}
    )
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_trials_spread_over_nodes_and_never_oversubscribe_a_gpu(two_gpu_nodes, ne_cache, tmp_path):
    cluster, workers = two_gpu_nodes
    sets = {
        "trial.data.cache": str(ne_cache),
        "trial.model.backbone": "test_resnet",
        "trial.train.epochs": "2",
        "trial.train.batch_size": "32",
        "storage_path": str(tmp_path),
        "resources.cpu": "0.25",
        "resources.gpu": "0.5",
        "max_concurrent_trials": "8",
        "num_samples": "6",
        "scheduler.type": "fifo",
    }
    outcome = run_sweep(
        ROOT / "search_spaces/demo.yaml",
        address=cluster.address,
        overrides=[f"{k}={v}" for k, v in sets.items()],
    )
    assert [r["state"] for r in outcome.rows] == ["DONE"] * 6
    _, _, children = sweep_runs(outcome.tracking_uri, "demo")
    assert len(children) == 6
    worker_ids = {w.node_id for w in workers}
    nodes = {r.data.tags["ray.node_id"] for r in children}
    assert nodes == worker_ids  # both GPU nodes got trials, the GPU-less head none
    peak = peak_trials_per_gpu(children)
    assert len(peak) == 2 and max(peak.values()) <= 2, peak


def test_node_lost_mid_sweep_trials_continue_from_their_checkpoints(two_gpu_nodes, ne_cache, tmp_path):
    import threading

    cluster, workers = two_gpu_nodes
    overrides = sweep_overrides(
        ne_cache,
        tmp_path,
        **{
            "trial.model.backbone": "test_resnet",
            "trial.train.epochs": "8",
            "trial.train.early_stop_patience": "8",
            "trial.train.batch_size": "8",
            "resources.cpu": "0.5",
            "resources.gpu": "1",
            "num_samples": "3",
            "scheduler.type": "fifo",
            "max_failures": "3",
        },
    )
    removed = {}

    def remove_a_worker_once_a_trial_checkpointed_twice():
        # both running trials (one per GPU node) have two checkpoints: the removed node's trial has one
        # (checkpoints rotate, num_to_keep=2: count trials holding any checkpoint past the first)
        def trials_checkpointed_twice() -> int:
            return len(
                {p.parent for p in tmp_path.glob("demo/*/checkpoint_*") if not p.name.endswith("_000000")}
            )

        deadline = time.time() + 300
        while time.time() < deadline and trials_checkpointed_twice() < 2:
            time.sleep(0.2)
        removed["at"] = time.time()
        cluster.remove_node(workers[1])

    killer = threading.Thread(target=remove_a_worker_once_a_trial_checkpointed_twice, daemon=True)
    killer.start()
    outcome = run_sweep(ROOT / "search_spaces/demo.yaml", address=cluster.address, overrides=overrides)
    killer.join(timeout=5)
    assert "at" in removed
    assert [r["state"] for r in outcome.rows] == ["DONE"] * 3
    client, _, children = sweep_runs(outcome.tracking_uri, "demo")
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)  # one run per trial
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_f1_macro")]
        # a trial restarted from scratch would log epochs 0.. twice; resumed ones log each once
        assert sorted(steps) == list(range(8)), steps
    assert {r.data.tags["ray.node_id"] for r in children} <= {w.node_id for w in workers}
    assert len({r.data.tags["ray.trial_id"] for r in children}) == 3
    # the trial on the removed node was rescheduled on the other one and resumed from its checkpoint
    lost, affected = workers[1].node_id, 0
    for result_file in tmp_path.glob("demo/*/result.json"):
        lines = [json.loads(x) for x in result_file.read_text().splitlines() if x.strip()]
        nodes = [x["node_id"] for x in lines]
        if lost in nodes and nodes[-1] != lost:
            affected += 1
            before = max(x["epoch"] for x in lines if x["node_id"] == lost and "epoch" in x)
            after = next(x for x in lines if x["node_id"] != lost)
            # resumed from the last checkpoint Tune registered: its last report's, or the one before
            # when the node died between the report and Tune's save of its checkpoint (a second call
            # to the trial's actor). Never from scratch once the driver had an epoch after the first:
            # the trigger counts checkpoint folders, which the worker writes before the driver has the
            # result, so the lost node's last result the driver saw can be epoch 0 (CI, beside another
            # suite: (0, 1), resumed after epoch 0's checkpoint)
            assert after["epoch"] in (before, before + 1), (before, after["epoch"])
            assert after["epoch"] >= 1 or before == 0, (before, after["epoch"])
            assert lines[-1].get("trial_done") == 1
    assert affected >= 1
    assert not list(tmp_path.glob(".cxr-storage-check-*"))  # the shared-storage probe cleaned up


def _mount_namespaces_work() -> bool:
    try:
        return (
            subprocess.run(["unshare", "-m", "--propagation", "private", "true"], timeout=10).returncode == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def node_with_its_own_storage(tmp_path):
    """Head + a GPU worker + a GPU worker that sees ``tmp_path/storage`` as an empty private tmpfs.

    The third node runs in its own mount namespace: the same path, another filesystem, as on a
    cluster whose storage_path is a node-local directory instead of a shared mount.
    """
    import ray
    from ray.cluster_utils import Cluster

    if not _mount_namespaces_work():
        reason = "needs `unshare -m` (root with CAP_SYS_ADMIN) to give one Ray node its own filesystem"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    storage = tmp_path / "storage"
    storage.mkdir()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}
    )
    sharing = cluster.add_node(num_cpus=1, num_gpus=1)
    ray_bin = Path(sys.executable).parent / "ray"
    start = (
        f"mount -t tmpfs cxr-node-local {shlex.quote(str(storage))} && exec {shlex.quote(str(ray_bin))} "
        f"start --block --address={cluster.address} --num-cpus=1 --num-gpus=1 --disable-usage-stats"
    )
    log = (tmp_path / "private-node.log").open("w")
    private = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", start],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        deadline = time.time() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 3:
            assert private.poll() is None, (tmp_path / "private-node.log").read_text()[-2000:]
            assert time.time() < deadline, "the private-storage node did not join in 120 s"
            time.sleep(0.5)
        known = {cluster.head_node.node_id, sharing.node_id}
        (private_id,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in known]
        yield cluster, storage, private_id
    finally:
        ray.shutdown()
        os.killpg(private.pid, signal.SIGTERM)
        try:
            private.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(private.pid, signal.SIGKILL)
        log.close()
        cluster.shutdown()


def test_storage_path_not_shared_by_a_node_is_refused_before_any_trial(node_with_its_own_storage, ne_cache):
    cluster, storage, private_id = node_with_its_own_storage
    overrides = sweep_overrides(
        ne_cache,
        storage,
        **{"trial.model.backbone": "test_resnet", "resources.cpu": "0.5", "resources.gpu": "1"},
    )
    with pytest.raises(ConfigError, match="is not shared across the cluster's nodes") as err:
        run_sweep(ROOT / "search_spaces/demo.yaml", address=cluster.address, overrides=overrides)
    msg = str(err.value)
    assert f"(node {private_id[:8]}): cannot read" in msg and "No such file" in msg, msg
    assert msg.count("(node ") == 1  # the node that shares the directory is not blamed
    assert str(storage) in msg and "s3://" in msg and "docs/cluster.md" in msg
    # nothing started, nothing half-written: no probe files, no sweep folder, no MLflow store
    assert sorted(p.name for p in storage.iterdir()) == []
