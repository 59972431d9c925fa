"""Storage faults: a read-only or full storage path, storage filling up mid-sweep, a cache on a
read-only filesystem.

Real filesystems: small tmpfs mounts (needs root, as in CI; elsewhere these tests skip unless
``CI`` is set, where they must run).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sweeps.cli import app
from tests.conftest import assert_one_run_per_trial_and_no_duplicate_epochs, sweep_overrides
from trainer.checkpoint import safe_load

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from sweeps.cli import app; app()"]
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


def _fill(fs: Path, leave_mib: int) -> None:
    """Take all of ``fs``'s free space but ``leave_mib`` (as another job on the disk would). The
    sweep writes meanwhile: a size measured a moment before may no longer fit, so it is retried
    smaller; ``leave_mib=0`` then writes zeros until the disk is full."""
    filler = fs / "someone-elses-file"
    for _ in range(20):
        st = os.statvfs(fs)
        size = st.f_bavail * st.f_frsize - (leave_mib + 2) * 2**20
        if size <= 0 or subprocess.run(["fallocate", "-l", str(size), str(filler)]).returncode == 0:
            break
        filler.unlink(missing_ok=True)
    if leave_mib == 0:
        with contextlib.suppress(OSError), (fs / "someone-elses-last-bytes").open("wb") as f:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()


def _started(output: str) -> dict[str, str]:
    """trial id → the λ and parameters its 'started' line shows."""
    return dict(re.findall(r"trial (\w+) started: (.*)", output))


@pytest.mark.slow
@pytest.mark.parametrize("leave_mib", [0, 12], ids=["all-at-once", "below-reserve"])
def test_storage_filling_up_mid_sweep_stops_it_and_resume_finishes_it(ne_cache, tmp_path, leave_mib):
    """The disk fills after the first checkpoint: at once (writes fail, Ray's state is cut short
    mid-write) or to below the guard's reserve (the sweep stops before a write fails). Either way:
    one line that names the storage and the resume command, no corrupt checkpoint, and ``sweep
    resume`` finishes every trial, each with the λ it started with, one MLflow run each."""
    extra = {"scheduler.type": "fifo", "search.algorithm": "random", "search.points_to_evaluate": "[]"}
    extra |= {"trial.model.backbone": "test_resnet", "num_samples": "4", "trial.train.epochs": "3"}
    with tmpfs(tmp_path / "fs", size="160m") as fs:
        sets = sweep_overrides(ne_cache, fs, **extra)
        args = [
            *CLI,
            "sweep",
            "run",
            str(ROOT / "search_spaces/demo.yaml"),
            *[a for s in sets for a in ("--set", s)],
        ]
        log = tmp_path / "run.log"
        with log.open("w") as out:
            driver = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 300
            while not list((fs / "demo").glob("*/checkpoint_*")):
                assert driver.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in 5 minutes"
                time.sleep(0.2)
            _fill(fs, leave_mib)
            rc = driver.wait(timeout=300)
        output = log.read_text()
        last = output.strip().splitlines()[-1]
        assert rc == 2, output[-3000:]
        assert last.startswith(f"error: sweep 'demo' stopped: storage_path {fs} is full"), output[-3000:]
        assert f"`cxr-sweep sweep resume demo --storage {fs}`" in last
        assert "Traceback" not in output, output[-3000:]
        assert not list((fs / "demo").glob(".*.tmp"))  # no temporary file left half-written
        checkpoints = sorted((fs / "demo").glob("*/checkpoint_*"))
        assert checkpoints  # kept for the resume
        for ckpt in checkpoints:  # none half-written: every file of every checkpoint loads
            for f in ckpt.rglob("*.pt"):
                safe_load(f)

        for f in fs.glob("someone-elses-*"):
            f.unlink()
        # Ray's state as the resume finds it, kept outside the tmpfs: what to read if the resume fails
        kept = tmp_path / "state-before-resume"
        shutil.copytree(fs / "demo", kept, ignore=shutil.ignore_patterns("checkpoint_*", "*.pt"))
        resume = subprocess.run(
            [*CLI, "sweep", "resume", "demo", "--storage", str(fs)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
        assert resume.stdout.count(" DONE ") == 4, (
            f"Ray's state before the resume: {kept}\n{resume.stdout[-3000:]}"
        )
        before, after = _started(output), _started(resume.stdout)
        assert before and all(after[t] == shown for t, shown in before.items() if t in after)
        assert_one_run_per_trial_and_no_duplicate_epochs(fs, 4)


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
