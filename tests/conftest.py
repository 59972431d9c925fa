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
