"""Fixtures for the results commands (best, report, export, predict, ui).

``crafted_sweep``: an MLflow store written directly with MlflowClient — a sweep parent run and
trial runs with chosen ``best_val_*`` / ``test_*`` metrics — so selection and report numbers can be
checked exactly and in milliseconds. ``real_sweep``: one real tiny sweep (Ray Tune, timm
``test_resnet`` at 64 px, two epochs, two trials), built once per test session and shared by the
export, predict and UI tests; ``real_export``: its best model exported once (no registry) for predict.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from trainer.metrics import METRIC_NAMES

from .conftest import sweep_overrides

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Crafted:
    uri: str
    experiment: str
    parent: str
    runs: dict[str, str] = field(default_factory=dict)  # label → run id
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # label → logged metrics


def _metrics(rng: random.Random, val_f1: float, test_f1: float, localization: bool) -> dict[str, float]:
    m = {}
    for name in METRIC_NAMES:
        m[f"best_val_{name}"] = round(rng.uniform(0.3, 0.9), 6)
        m[f"test_{name}"] = round(rng.uniform(0.3, 0.9), 6)
    m["best_val_f1_macro"], m["test_f1_macro"] = val_f1, test_f1
    if localization:
        m["best_val_pointing_game"], m["test_pointing_game"] = 0.5, round(rng.uniform(0.2, 0.9), 6)
        m["test_cam_in_region"] = round(rng.uniform(0.1, 0.6), 6)
    return m


def build_crafted(tmp_path: Path, *, name: str = "crafted", localization: bool = True) -> Crafted:
    """Sweep ``name``: 2 backbones × λ {1, 0.5, adaptive}, plus runs selection must skip or rank.

    - ``r50_half_b``: same cell as ``r50_half`` (other t), best on *test* of all, worse on validation;
    - ``stopped``: best validation of all but stopped early by ASHA (no test metrics);
    - ``failed``: FAILED; ``old``: child of an older parent run of the same sweep (an overwritten run);
    - ``vgg_one`` and ``vgg_half`` tie on validation (tie-break: trial id).
    """
    from mlflow.tracking import MlflowClient

    from sweeps.tracking.runs import experiment_id, log_metrics, log_params

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, name, uri)
    rng = random.Random(0)
    start = int(time.time() * 1000)
    old_parent = client.create_run(exp, run_name=name, tags={"cxr.kind": "sweep"}, start_time=start - 10_000)
    parent = client.create_run(exp, run_name=name, tags={"cxr.kind": "sweep"}, start_time=start)
    for pid in (old_parent.info.run_id, parent.info.run_id):
        client.log_param(pid, "metric", "val_f1_macro")
    out = Crafted(uri, name, parent.info.run_id)
    specs = [
        # label, backbone, λ, threshold, val F1, test F1, status, trial id
        ("r50_one", "resnet50", "1.0", "0.5", 0.70, 0.66, "FINISHED", "t_00000"),
        ("r50_half", "resnet50", "0.5", "0.5", 0.81, 0.72, "FINISHED", "t_00001"),
        ("r50_half_b", "resnet50", "0.5", "0.3", 0.74, 0.95, "FINISHED", "t_00002"),
        ("r50_adapt", "resnet50", "adaptive", "0.5", 0.78, 0.70, "FINISHED", "t_00003"),
        ("vgg_one", "vgg16", "1.0", "0.5", 0.83, 0.75, "FINISHED", "t_00004"),
        ("vgg_half", "vgg16", "0.5", "0.5", 0.83, 0.77, "FINISHED", "t_00005"),
        ("vgg_adapt", "vgg16", "adaptive", "0.5", 0.76, 0.74, "FINISHED", "t_00006"),
        ("stopped", "vgg16", "0.25", "0.5", 0.97, None, "FINISHED", "t_00007"),
        ("failed", "resnet50", "0.25", "0.5", 0.99, 0.99, "FAILED", "t_00008"),
        ("old", "resnet50", "0.75", "0.5", 0.98, 0.98, "FINISHED", "t_00009"),
    ]
    for label, backbone, lam, thr, val, test, status, tid in specs:
        pid = old_parent.info.run_id if label == "old" else parent.info.run_id
        tags = {"mlflow.parentRunId": pid, "cxr.kind": "trial", "cxr.sweep": name, "ray.trial_id": tid}
        run = client.create_run(exp, run_name=f"trial_{label}", tags=tags)
        rid = run.info.run_id
        log_params(
            client,
            rid,
            {
                "data.task": "ne",
                "model.backbone": backbone,
                "attention.lambda": lam,
                "attention.threshold": thr,
                "search.attention.lambda": lam,
                "search.attention.threshold": thr,
                # the loss mode: none for CE (λ = 1 takes no attention setting)
                **({} if lam == "1.0" else {"attention.mode": "soft" if lam == "0.5" else "paper"}),
            },
        )
        m = _metrics(rng, val, test if test is not None else 0.0, localization)
        if test is None:
            m = {k: v for k, v in m.items() if not k.startswith("test_")}
            client.set_tag(rid, "cxr.stopped_early", "true")
        log_metrics(client, rid, m)
        client.set_terminated(rid, status)
        out.runs[label], out.metrics[label] = rid, m
    for pid in (old_parent.info.run_id, parent.info.run_id):
        client.set_terminated(pid, "FINISHED")
    return out


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Crafted:
    """Read-only for the tests of one module (creating an MLflow database takes seconds)."""
    return build_crafted(tmp_path_factory.mktemp("crafted"))


def copy_crafted(c: Crafted, dest: Path) -> Crafted:
    """A private copy of the crafted store, for a test that changes it."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(c.uri.removeprefix("sqlite:///"), dest / "mlflow.db")
    return Crafted(f"sqlite:///{dest / 'mlflow.db'}", c.experiment, c.parent, dict(c.runs), dict(c.metrics))


# ---- one real tiny sweep, shared by the export / predict / ui tests -------------------------------------
@dataclass
class RealSweep:
    storage: Path
    name: str
    uri: str
    cache: Path
    phantoms: Path


_BUILT: dict[str, Any] = {}


def build_real_sweep(phantom_dir: Path, cache: Path, storage: Path) -> RealSweep:
    """A two-trial demo sweep on the session's phantom cache (two epochs, 64 px, timm test_resnet)."""
    if "sweep" in _BUILT:
        return _BUILT["sweep"]
    import ray

    from sweeps.driver import run_sweep

    started = not ray.is_initialized()
    if started:
        # address="local": a cluster of our own, even where someone else runs one on this machine
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    try:
        sets = sweep_overrides(
            cache,
            storage,
            **{
                "name": "results",
                "trial.model.backbone": "test_resnet",
                "trial.train.epochs": "2",
                "num_samples": "2",
                "scheduler.type": "fifo",
                "resources.cpu": "1",
            },
        )
        outcome = run_sweep(ROOT / "search_spaces/demo.yaml", overrides=sets)
    finally:
        if started:
            ray.shutdown()
    assert [r["state"] for r in outcome.rows] == ["DONE", "DONE"], outcome.rows
    _BUILT["sweep"] = RealSweep(storage, outcome.name, outcome.tracking_uri, cache, phantom_dir)
    return _BUILT["sweep"]


@pytest.fixture(scope="session")
def real_sweep(phantom_dir, ne_cache, tmp_path_factory) -> RealSweep:
    return build_real_sweep(phantom_dir, ne_cache, tmp_path_factory.mktemp("results-sweep"))


@pytest.fixture(scope="session")
def real_export(real_sweep, tmp_path_factory) -> Path:
    """The sweep's best model as TorchScript + ONNX (not registered: test_export covers the registry)."""
    if "export" not in _BUILT:
        from sweeps.results.export import export_model

        out = tmp_path_factory.mktemp("results-export") / "export"
        export_model(
            real_sweep.name, ["torchscript", "onnx"], out, storage=real_sweep.storage, register=False
        )
        _BUILT["export"] = out
    return _BUILT["export"]
