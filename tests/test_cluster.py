"""A simulated multi-node Ray cluster (ray.cluster_utils.Cluster) with fake GPUs."""

import json
from pathlib import Path

import pytest

from sweeps.driver import run_sweep

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
    import time

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
        deadline = time.time() + 300
        while time.time() < deadline and not list(tmp_path.glob("demo/*/checkpoint_000001")):
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
    # at least one trial was rescheduled: its results came from both nodes
    moved = 0
    for result_file in tmp_path.glob("demo/*/result.json"):
        lines = [json.loads(x) for x in result_file.read_text().splitlines() if x.strip()]
        moved += len({x["node_id"] for x in lines}) > 1
    assert moved >= 1
