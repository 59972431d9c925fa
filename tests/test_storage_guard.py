"""The storage guard's parts without a sweep: what counts as a full disk, the reserve, the stop,
half-written checkpoints, and Ray's state files put back after a cut-short write."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from sweeps.driver.failure import is_storage_full
from sweeps.driver.storage_guard import (
    GOOD_STATE_DIR,
    StateCutShort,
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


def _save(folder: Path, session: str, trials: int) -> tuple[Path, Path]:
    """One of Tune's saves: the experiment state and the searcher state (a pickle, named .json)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / f"experiment_state-{session}.json"
    searcher = folder / f"basic-variant-state-{session}.json"
    state.write_text(json.dumps({"trial_data": [[f"t{i}", "m"] for i in range(trials)]}))
    searcher.write_bytes(pickle.dumps({"generated": trials, "pad": list(range(500))}))
    return state, searcher


def _sync(staging: Path, storage: Path, cut: int | None = None) -> None:
    """Tune's copy of its staging folder into storage, in place; ``cut``: the disk fills after that
    many bytes of each file."""
    for f in staging.iterdir():
        data = f.read_bytes()
        (storage / f.name).write_bytes(data if cut is None else data[:cut])


def test_rays_state_cut_short_is_put_back_from_the_last_whole_save(tmp_path):
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    storage.mkdir()
    state, searcher = _save(staging, "2026-12-01_10-00-00", trials=2)
    assert keep_good_state(storage, staging)  # right after the save, before its copy into storage
    assert {p.name for p in (storage / GOOD_STATE_DIR).iterdir()} == {state.name, searcher.name}
    assert not keep_good_state(storage, staging)  # unchanged: not copied again
    _sync(staging, storage)
    whole = {f.name: f.read_bytes() for f in staging.iterdir()}
    _save(staging, "2026-12-01_10-00-00", trials=3)  # the next save: the disk fills as it is copied
    _sync(staging, storage, cut=10)
    assert repair_state(storage) == sorted(whole)
    assert {f.name: f.read_bytes() for f in storage.glob("*state-*.json")} == whole  # one whole save
    assert repair_state(storage) == []  # whole files are left alone


def test_a_set_is_kept_only_whole_and_a_failed_copy_leaves_the_old_set(tmp_path, monkeypatch):
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    storage.mkdir()
    _save(staging, "s1", trials=1)
    assert keep_good_state(storage, staging)
    first = {p.name: p.read_bytes() for p in (storage / GOOD_STATE_DIR).iterdir()}
    state, _ = _save(staging, "s1", trials=2)
    state.write_bytes(state.read_bytes()[:5])  # a save that is not whole is never kept
    assert not keep_good_state(storage, staging)
    _save(staging, "s1", trials=3)
    real_copy = shutil.copy2

    def full_disk(src, dst, **kw):
        if "basic-variant" in str(src):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, **kw)

    monkeypatch.setattr(shutil, "copy2", full_disk)
    assert not keep_good_state(storage, staging)
    assert {p.name: p.read_bytes() for p in (storage / GOOD_STATE_DIR).iterdir()} == first
    assert sorted(p.name for p in storage.iterdir()) == [GOOD_STATE_DIR]  # nothing half-written


def test_a_cut_short_save_newer_than_the_kept_set_is_set_aside(tmp_path):
    """The kept set is from an earlier session; the newer session's files (one whole, one not) are
    renamed, so Ray does not restore a mix of two saves."""
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    storage.mkdir()
    _save(staging, "2026-12-01_10-00-00", trials=2)
    keep_good_state(storage, staging)
    _sync(staging, storage)
    newer = tmp_path / "newer"
    state, searcher = _save(newer, "2026-12-01_11-00-00", trials=3)
    (storage / searcher.name).write_bytes(searcher.read_bytes())
    (storage / state.name).write_bytes(state.read_bytes()[:7])
    repair_state(storage)
    assert sorted(p.name for p in storage.glob("*.cut-short")) == sorted(
        [f"{state.name}.cut-short", f"{searcher.name}.cut-short"]
    )
    assert sorted(p.name for p in storage.glob("*state-*.json")) == sorted(p.name for p in staging.iterdir())


def test_cut_short_state_without_a_whole_copy_is_refused_naming_the_file(tmp_path):
    state, _ = _save(tmp_path, "s1", trials=4)
    state.write_bytes(state.read_bytes()[:12])
    with pytest.raises(
        StateCutShort, match=rf"^{state}: Ray's state was cut short .* cannot be resumed; run it again$"
    ):
        repair_state(tmp_path)
    assert state.read_bytes() and not list(tmp_path.glob("*.cut-short"))  # nothing changed


def test_the_guard_keeps_tunes_staged_save_after_each_step(tmp_path):
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    storage.mkdir()
    state, _ = _save(staging, "s1", trials=1)
    guard = StorageGuard(storage, folder=storage)
    trial = SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))
    guard.on_step_end(iteration=1, trials=[trial])
    assert (storage / GOOD_STATE_DIR / state.name).read_bytes() == state.read_bytes()
    _save(staging, "s1", trials=2)
    guard.on_step_end(iteration=2, trials=[trial])  # within keep_every_s of the last: not compared
    assert (storage / GOOD_STATE_DIR / state.name).read_bytes() != state.read_bytes()
    guard._last_keep = float("-inf")
    guard.on_step_end(iteration=3, trials=[trial])
    assert (storage / GOOD_STATE_DIR / state.name).read_bytes() == state.read_bytes()


def test_ray_state_files_are_matched(tmp_path: Path):
    names = ("experiment_state-a.json", "basic-variant-state-a.json", "searcher-state-a.pkl")
    names += ("callback-states-a.pkl", "tuner.pkl")
    for name in names:
        (tmp_path / name).write_bytes(pickle.dumps({"x": 1}))
    keep_good_state(tmp_path)
    kept = sorted(p.name for p in (tmp_path / GOOD_STATE_DIR).iterdir())
    assert kept == sorted(names[:4])  # Ray's state files; the tuner (written once, at the start) is not
