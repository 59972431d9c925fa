"""Shared fixtures: small phantom caches built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from trainer.data.phantom import generate
    from trainer.tasks import classes_for

    out = tmp_path_factory.mktemp("phantoms")
    generate(out, n_patients=60, classes=classes_for("neps"), size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def ne_cache(phantom_dir, tmp_path_factory) -> Path:
    from trainer.data.sources import cache_from_phantoms

    return cache_from_phantoms(phantom_dir, tmp_path_factory.mktemp("cache") / "ne", "ne")


@pytest.fixture(scope="session")
def nep_cache(phantom_dir, tmp_path_factory) -> Path:
    from trainer.data.sources import cache_from_phantoms

    return cache_from_phantoms(phantom_dir, tmp_path_factory.mktemp("cache") / "nep", "nep")


def tiny_config(cache: Path, out: Path, task: str = "ne", **sections) -> dict:
    """A config dict for a seconds-long trial: resnet18-size model at 64 px."""
    cfg = {
        "name": "t",
        "output_dir": str(out),
        "data": {"cache": str(cache), "task": task},
        "model": {"backbone": "test_resnet"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "seed": 0},
        "attention": {"lambda": 0.5, "mode": "soft", "tau": 0.1, "cam_target": "label"},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


def sweep_overrides(cache: Path, storage: Path, **extra: str) -> list[str]:
    """``--set`` overrides that shrink a shipped sweep to this machine: 64 px, small batches."""
    sets = {
        "trial.data.cache": str(cache),
        "trial.model.image_size": "64",
        "trial.train.batch_size": "32",
        "storage_path": str(storage),
        "resources.cpu": "1",
        "resources.gpu": "0",
        "max_concurrent_trials": "2",
        **extra,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def epochs_logged(db: Path) -> int:
    """Training epochs logged so far in a sqlite MLflow store (read-only, while a sweep writes it)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM metrics WHERE key = 'train_loss'").fetchone()[0]
    except sqlite3.Error:
        return 0


def sweep_runs(tracking_uri: str, experiment: str):
    """(client, parent runs, child runs) of one sweep experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("cxr.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("cxr.kind") == "trial"]
    return client, parents, children


def peak_trials_per_gpu(children) -> dict:
    """Most trial runs alive at once on each (node, GPU id), from the runs' start and end times."""
    events = []
    for r in children:
        gpu = (r.data.tags["ray.node_id"], r.data.tags["ray.gpu_ids"])
        events += [(r.info.start_time, 1, gpu), (r.info.end_time, -1, gpu)]
    load: dict = {}
    peak: dict = {}
    for _, d, gpu in sorted(events):
        load[gpu] = load.get(gpu, 0) + d
        peak[gpu] = max(peak.get(gpu, 0), load[gpu])
    return peak


def _phantom_pairs(phantom_dir: Path, limit: int | None = None):
    from trainer.data.pairs import find_pairs
    from trainer.segmenter import load_pairs_resized

    pairs = find_pairs(phantom_dir / "images", phantom_dir / "lung_masks").pairs[:limit]
    return load_pairs_resized(pairs, 64)


# a compact U-Net that reaches Dice > 0.98 on 64-px phantoms in about 20 s on 2 cores
SMALL_UNET = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": (64, 32, 16), "input_size": 64}


@pytest.fixture(scope="session")
def lung_segmenter(phantom_dir, tmp_path_factory) -> Path:
    """A lung U-Net trained on the session's phantoms (8 epochs at 64 px)."""
    from trainer.segmenter import SegmenterMeta, train_segmenter

    x, y = _phantom_pairs(phantom_dir)
    out = tmp_path_factory.mktemp("segmenter") / "lung_unet.pt"
    train_segmenter(
        x, y, out, meta=SegmenterMeta(**SMALL_UNET), epochs=8, batch_size=16, lr=3e-3, device="cpu"
    )
    return out


@pytest.fixture(scope="session")
def quick_segmenter(phantom_dir, tmp_path_factory) -> Path:
    """A barely trained U-Net (1 epoch on 8 images): for plumbing tests, not for mask quality."""
    from trainer.segmenter import SegmenterMeta, train_segmenter

    x, y = _phantom_pairs(phantom_dir, limit=8)
    out = tmp_path_factory.mktemp("segmenter") / "quick_unet.pt"
    train_segmenter(
        x, y, out, meta=SegmenterMeta(**SMALL_UNET), epochs=1, batch_size=8, device="cpu", augment=False
    )
    return out


def bare_callback(client, **attrs):
    """The callback's state without a sweep: a run per trial id in ``attrs['runs']``."""
    import threading

    import sweeps.tracking.callback as cb
    from sweeps.tracking.writer import TrackingWriter

    callback = cb.MlflowSweepCallback.__new__(cb.MlflowSweepCallback)
    callback.client, callback.tracking_uri = client, "sqlite"
    callback.runs, callback.described, callback.tagged, callback.interrupted = {}, set(), set(), set()
    callback.unsure, callback.seeds_seen = set(), set()
    callback.seed_runs, callback.last_epoch, callback.logged_metrics = {}, {}, 0
    callback._count, callback._fetching, callback.fetched = threading.Lock(), threading.Lock(), {}
    for k, v in attrs.items():
        setattr(callback, k, v)
    callback.writer = TrackingWriter(callback._run_hook, 1, callback._forget_last_epoch)
    return callback


def assert_one_run_per_trial_and_no_duplicate_epochs(storage: Path, n_trials: int) -> None:
    """The sweep `demo` in ``storage`` (sqlite MLflow there): one parent, one run per trial, none
    left RUNNING, no epoch logged twice."""
    client, parents, children = sweep_runs(f"sqlite:///{storage / 'mlflow.db'}", "demo")
    assert len(parents) == 1
    tids = [r.data.tags["ray.trial_id"] for r in children]
    assert len(children) == n_trials == len(set(tids))  # one run per trial, no duplicates
    assert all(r.info.status in ("FINISHED", "FAILED") for r in children)  # none left RUNNING
    for r in children:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")]
        assert len(steps) == len(set(steps)), f"epoch logged twice in {r.info.run_name}: {sorted(steps)}"


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of the test module's own (2 CPUs): ``address="local"``, never another suite's Ray."""
    import ray

    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    yield
    ray.shutdown()
