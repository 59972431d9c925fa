"""Storage faults: a read-only or full storage path, a cache on a read-only filesystem.

Real filesystems: small tmpfs mounts (needs root, as in CI; elsewhere these tests skip unless
``CI`` is set, where they must run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sweeps.cli import app
from tests.conftest import sweep_overrides

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@contextmanager
def tmpfs(path: Path, size: str = "8m"):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount tmpfs (CI runs as root): {done.stderr.decode()}")
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def _sweep(storage: Path, cache: Path) -> list[str]:
    sets = sweep_overrides(cache, storage, num_samples="1", **{"trial.model.backbone": "test_resnet"})
    return [
        "sweep",
        "run",
        str(ROOT / "search_spaces/demo.yaml"),
        "--smoke",
        *[a for s in sets for a in ("--set", s)],
    ]


def test_read_only_storage_path_is_refused_before_any_trial(ne_cache, tmp_path):
    with tmpfs(tmp_path / "ro") as ro:
        _read_only(ro)
        result = runner.invoke(app, _sweep(ro / "sweeps", ne_cache))
    assert result.exit_code == 2, result.output
    assert "storage_path:" in result.output and "is not writable: Read-only file system" in result.output


def test_full_storage_path_is_refused_before_any_trial(ne_cache, tmp_path):
    with tmpfs(tmp_path / "small", size="1m") as small:
        result = runner.invoke(app, _sweep(small, ne_cache))
        left = sorted(p.name for p in small.iterdir())
    assert result.exit_code == 2, result.output
    assert "MiB free; a sweep needs at least 100 MiB" in result.output
    assert left == []  # nothing written: no MLflow store, no Ray state


def test_cache_on_a_read_only_filesystem_trains(ne_cache, tmp_path):
    with tmpfs(tmp_path / "cachefs", size="64m") as fs:
        shutil.copytree(ne_cache, fs / "ne")
        _read_only(fs)
        args = [
            "train",
            "--config",
            str(ROOT / "configs/trial.yaml"),
            "--set",
            f"data.cache={fs / 'ne'}",
            "--set",
            "model.backbone=test_resnet",
            "--epochs",
            "1",
            "--output-dir",
            str(tmp_path / "run"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.pt").is_file()


def test_prepare_into_a_read_only_filesystem_is_a_clear_error(phantom_dir, tmp_path):
    with tmpfs(tmp_path / "rofs") as ro:
        _read_only(ro)
        args = [
            "prepare",
            "csv",
            "--csv",
            str(phantom_dir / "labels.csv"),
            "--task",
            "ne",
            "--out",
            str(ro / "cache"),
            "--size",
            "64",
            "--data-access",
            "synthetic",
        ]
        result = runner.invoke(app, args)
        assert list(ro.iterdir()) == []
    assert result.exit_code == 2, result.output
    assert "Read-only file system" in result.output and "Traceback" not in result.output
