"""A simulated multi-node Ray cluster (ray.cluster_utils.Cluster) with fake GPUs."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeps.driver import run_sweep

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
    client = MlflowClient(outcome.tracking_uri)
    exp = client.get_experiment_by_name("demo")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("cxr.kind") == "trial"]
    assert len(children) == 6
    worker_ids = {w.node_id for w in workers}
    nodes = {r.data.tags["ray.node_id"] for r in children}
    assert nodes == worker_ids  # both GPU nodes got trials, the GPU-less head none
    events = []
    for r in children:
        gpu = (r.data.tags["ray.node_id"], r.data.tags["ray.gpu_ids"])
        events += [(r.info.start_time, 1, gpu), (r.info.end_time, -1, gpu)]
    load: dict = {}
    peak: dict = {}
    for _, d, gpu in sorted(events):
        load[gpu] = load.get(gpu, 0) + d
        peak[gpu] = max(peak.get(gpu, 0), load[gpu])
    assert len(peak) == 2 and max(peak.values()) <= 2, peak
