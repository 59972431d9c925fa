"""The storage guard's parts without a sweep: what counts as a full disk, the reserve, the stop,
half-written checkpoints, and Ray's state files put back after a cut-short write."""

from __future__ import annotations

import errno
import json
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from sweeps.driver.failure import is_storage_full
from sweeps.driver.storage_guard import (
    GOOD_STATE_DIR,
    StorageFull,
    StorageGuard,
    keep_good_state,
    remove_unregistered_checkpoints,
    repair_state,
)


def test_a_full_disk_is_recognised_through_the_chain_of_causes():
    class RayTaskError(Exception):  # Ray's wrapper: the trial's own error in .cause
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    assert is_storage_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_full(RayTaskError(OSError(28, "Error writing bytes to file")))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e
    except RuntimeError as e:
        assert is_storage_full(e)
    assert is_storage_full(Exception("(sqlite3.OperationalError) database or disk is full"))
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_storage_full(ValueError("val_f1_macro is NaN"))


def _guard(tmp_path, free_mib: float, **kw) -> StorageGuard:
    guard = StorageGuard(tmp_path, **kw)
    guard.free_bytes = lambda: int(free_mib * 2**20)  # type: ignore[method-assign]
    return guard


def test_the_sweep_stops_below_the_reserve_as_tune_stops_on_a_signal(tmp_path):
    got, notified = [], []
    old = signal.signal(signal.SIGUSR1, lambda *_: got.append("stop"))  # Tune's handler, here
    try:
        roomy = _guard(tmp_path, 100, reserve_mb=32)
        roomy.on_trial_result(0, [], SimpleNamespace(trial_id="t1"), {})
        assert roomy.full is None and got == []
        short = _guard(tmp_path, 10, reserve_mb=32, on_full=lambda: notified.append(1))
        short.on_trial_recover(0, [], SimpleNamespace(trial_id="t1"))
        short.on_trial_result(0, [], SimpleNamespace(trial_id="t2"), {})  # stops once
        signal.getsignal(signal.SIGUSR1)  # let the pending signal run
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert got == ["stop"] and notified == [1]
    assert "is full: 10.0 MiB free, below the 32 MiB" in short.full and "trial t1 failed" in short.full


def test_the_reserve_grows_to_two_of_the_largest_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoint_000000"
    ckpt.mkdir()
    (ckpt / "trial_state.pt").write_bytes(b"\0" * (30 * 2**20))
    guard = _guard(tmp_path, 50, reserve_mb=32)
    guard.stop = lambda reason: setattr(guard, "full", reason)  # type: ignore[method-assign]
    guard.on_checkpoint(0, [], SimpleNamespace(trial_id="t"), SimpleNamespace(path=str(ckpt)))
    assert guard.reserve_bytes() == 60 * 2**20 and "below the 60 MiB" in guard.full


def test_without_tunes_handler_the_stop_is_an_error(tmp_path):
    old = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # the default would kill the process
    try:
        with pytest.raises(StorageFull) as e:
            _guard(tmp_path, 1).stop("storage_path x is full")
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert is_storage_full(e.value)


def test_half_written_checkpoints_newer_than_the_registered_one_are_removed(tmp_path):
    for i in range(3):
        (tmp_path / f"checkpoint_00000{i}").mkdir()
    trial = SimpleNamespace(
        storage=SimpleNamespace(
            storage_filesystem=type("LocalFileSystem", (), {})(), trial_fs_path=str(tmp_path)
        ),
        checkpoint=SimpleNamespace(path=str(tmp_path / "checkpoint_000001")),
    )
    removed = remove_unregistered_checkpoints(trial)
    assert [p.name for p in removed] == ["checkpoint_000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000000", "checkpoint_000001"]


def test_rays_state_cut_short_is_put_back_from_its_last_whole_copy(tmp_path):
    state = tmp_path / "experiment_state-2026-12-01_10-00-00.json"
    searcher = tmp_path / "basic-variant-state-2026-12-01_10-00-00.json"  # a pickle, named .json
    state.write_text(json.dumps({"trial_data": [["t1", "m1"]]}))
    searcher.write_bytes(pickle.dumps({"iterators": list(range(500))}))
    keep_good_state(tmp_path)
    good = {p.name for p in (tmp_path / GOOD_STATE_DIR).iterdir()}
    assert good == {state.name, searcher.name}
    whole_state, whole_searcher = state.read_bytes(), searcher.read_bytes()
    state.write_bytes(whole_state[:10])  # the disk filled while Ray wrote them
    searcher.write_bytes(whole_searcher[:40])
    keep_good_state(tmp_path)  # a cut-short file never replaces the whole copy
    assert repair_state(tmp_path) == sorted([searcher.name, state.name])
    assert state.read_bytes() == whole_state and searcher.read_bytes() == whole_searcher
    assert repair_state(tmp_path) == []  # whole files are left alone


def test_ray_state_files_are_matched(tmp_path: Path):
    names = ("experiment_state-a.json", "basic-variant-state-a.json", "searcher-state-a.pkl", "tuner.pkl")
    for name in names:
        (tmp_path / name).write_bytes(pickle.dumps({"x": 1}))
    keep_good_state(tmp_path)
    kept = sorted(p.name for p in (tmp_path / GOOD_STATE_DIR).iterdir())
    assert kept == sorted(names[:3])  # Ray's state files; the tuner (written once, at the start) is not
