"""Storage that fills up during a sweep: the sweep stops cleanly and a resume finishes it.

Checkpoints accumulate in the sweep's ``storage_path``, and often the embedded MLflow store and
Ray's experiment state share its filesystem. :class:`StorageGuard`, a Tune callback in the driver,
watches the free space there after every result and checkpoint:

- below the **reserve** (``CXR_STORAGE_RESERVE_MB``, default 32 MiB, or two of the sweep's largest
  checkpoints if more), it stops the sweep *before* a write fails;
- a trial that fails while the storage is below the reserve failed for want of space: the sweep
  stops rather than retrying it into the same full disk (space taken at once by someone else).

It stops the sweep the way Tune documents (``SIGUSR1``: the same as a first Ctrl-C), so Tune ends
the trials and saves its experiment state; the driver then fails with one line naming the storage
and the ``sweep resume`` command. Checkpoint folders that a failed copy left half-written (not
registered with Ray, so never restored from) are removed. Nothing is deleted from a sweep that
stopped this way: its checkpoints are what the resume continues from.

Tune saves its experiment state into a staging folder on the driver, then copies it into storage
in place (not to a temporary file first): a disk that fills during that copy leaves a state file
truncated, and Ray cannot restore from it. After each of Tune's saves the guard keeps the whole set
of state files of that save (from the staging folder: experiment, searcher and callback state, all
of one save) in :data:`GOOD_STATE_DIR`, written beside the old set and swapped in by renames, so a
copy cut short leaves the previous set. :func:`repair_state`, run by ``sweep resume``, puts that set
back when a state file in storage is not whole, and refuses (one line naming the file) when no
whole set was kept: a resume from cut-short state would run part of the sweep.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickletools
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

__all__ = [
    "GOOD_STATE_DIR",
    "RESERVE_MB",
    "StateCutShort",
    "StorageFull",
    "StorageGuard",
    "keep_good_state",
    "remove_unregistered_checkpoints",
    "repair_state",
    "state_files",
]

RESERVE_MB = float(os.environ.get("CXR_STORAGE_RESERVE_MB", "32"))
GOOD_STATE_DIR = ".state-last-good"  # in the sweep folder: the last whole copy of Ray's state files
_STATE_GLOBS = ("experiment_state-*.json", "*-state-*.json", "*-state-*.pkl", "callback-states-*.pkl")


class StorageFull(OSError):
    """The sweep's storage ran out of space (raised where Tune's stop signal cannot be used)."""


class StateCutShort(ValueError):
    """Ray's state in storage is not whole and no whole copy of it was kept: it cannot be resumed."""


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def _whole(path: Path) -> bool:
    """Whether Ray's state file ``path`` is complete: JSON that parses, or a pickle whose opcodes
    run to its STOP (read with :mod:`pickletools`, which executes nothing)."""
    try:
        data = path.read_bytes()
        if not data.startswith(b"\x80"):  # not a pickle (Ray's searcher states are, named .json)
            json.loads(data)
            return True
        ops = list(pickletools.genops(data))
        return bool(ops) and ops[-1][0].name == "STOP"
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def state_files(folder: Path) -> list[Path]:
    """Ray's experiment state files in ``folder``: experiment, searcher and callback state."""
    return sorted({p for pattern in _STATE_GLOBS for p in folder.glob(pattern) if p.is_file()})


def _same(a: Path, b: Path) -> bool:
    """Whether ``b`` is the copy of ``a`` (:func:`shutil.copy2` keeps the modification time)."""
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return sa.st_mtime_ns == sb.st_mtime_ns and sa.st_size == sb.st_size


def keep_good_state(folder: Path, source: Path | None = None) -> bool:
    """Keep the set of Ray's state files in ``source`` (Tune's staging folder; default ``folder``)
    in ``folder``/:data:`GOOD_STATE_DIR`, if every one of them is whole and one changed since the
    set kept last. The new set is written beside the old one and swapped in by renames: a copy that
    fails (a full disk) leaves the old set. Returns whether a new set was kept."""
    folder = Path(folder)
    files = state_files(Path(source) if source is not None else folder)
    good = folder / GOOD_STATE_DIR
    kept = {p.name for p in state_files(good)} if good.is_dir() else set()
    if not files or ({p.name for p in files} == kept and all(_same(p, good / p.name) for p in files)):
        return False
    if not all(_whole(p) for p in files):
        return False
    new, old = folder / f"{GOOD_STATE_DIR}.new", folder / f"{GOOD_STATE_DIR}.old"
    try:
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        for path in files:
            shutil.copy2(path, new / path.name)
        if not all(_same(p, new / p.name) for p in files):  # one changed while it was copied
            raise OSError(f"{source or folder}: Ray's state changed while it was copied")
        shutil.rmtree(old, ignore_errors=True)
        if good.exists():
            os.replace(good, old)
        os.replace(new, good)
    except OSError:
        if not good.exists() and old.exists():
            with contextlib.suppress(OSError):
                os.replace(old, good)
        return False
    finally:
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return True


def repair_state(folder: Path) -> list[str]:
    """If one of Ray's state files in ``folder`` is not whole (a disk that filled while Ray wrote
    it), put back the last whole set from :data:`GOOD_STATE_DIR`; state files newer than that set
    and not in it (the save that was cut short) are renamed ``*.cut-short``, so Ray restores one
    consistent save. Returns the names put back (none: every file was whole).

    Raises :class:`StateCutShort`, naming the file, when a state file is not whole and no whole
    set was kept."""
    folder = Path(folder)
    live = state_files(folder)
    broken = [p for p in live if not _whole(p)]
    if not broken:
        return []
    good = folder / GOOD_STATE_DIR
    kept = state_files(good) if good.is_dir() else []
    if not kept or not all(_whole(k) for k in kept):
        raise StateCutShort(
            f"{broken[0]}: Ray's state was cut short (its disk filled, or the driver stopped, while "
            f"Ray wrote it) and no whole copy of it was kept in {good}: the sweep cannot be resumed; "
            "run it again"
        )
    newest = max(k.stat().st_mtime_ns for k in kept)
    names = {k.name for k in kept}
    for path in live:
        if path.name not in names and (path in broken or path.stat().st_mtime_ns > newest):
            os.replace(path, path.with_name(path.name + ".cut-short"))
    for k in kept:
        tmp = folder / f".{k.name}.tmp"
        shutil.copy2(k, tmp)
        os.replace(tmp, folder / k.name)
    return sorted(names)


class StorageGuard(Callback):
    """Stops the sweep when its local ``storage`` runs short of space (see the module docstring).

    ``full`` is then the reason (one line); ``on_full`` is called once, as the sweep stops."""

    def __init__(
        self,
        storage: str | Path,
        *,
        folder: str | Path | None = None,
        on_full=None,
        reserve_mb: float | None = None,
    ) -> None:
        self.storage = Path(storage)
        self.folder = Path(folder) if folder is not None else None  # the sweep's folder (local storage)
        self.reserve = (RESERVE_MB if reserve_mb is None else reserve_mb) * 2**20
        self.largest_checkpoint = 0
        self.on_full = on_full
        self.full: str | None = None
        self.keep_every_s = 0.5  # how often the kept state is compared with Tune's last save
        self._last_keep = float("-inf")

    # -- the free space ---------------------------------------------------------------------------
    def reserve_bytes(self) -> float:
        return max(self.reserve, 2 * self.largest_checkpoint)

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.storage).free
        except OSError:
            return None

    def _short(self) -> str | None:
        free = self.free_bytes()
        if free is None or free >= self.reserve_bytes():
            return None
        return (
            f"storage_path {self.storage} is full: {free / 2**20:.1f} MiB free, below the "
            f"{self.reserve_bytes() / 2**20:.0f} MiB a sweep keeps for its next checkpoints"
        )

    def _check(self, context: str = "") -> None:
        if self.full is None and (reason := self._short()):
            self.stop(reason + context)

    def stop(self, reason: str) -> None:
        """Stop the sweep as a first Ctrl-C does (Tune saves its state and ends the trials)."""
        if self.full is not None:
            return
        self.full = reason
        if self.on_full is not None:
            self.on_full()
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):  # Tune's stop handler (installed when it runs in the main thread)
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            raise StorageFull(errno.ENOSPC, reason)

    # -- Tune hooks ----------------------------------------------------------------------------------
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._check()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        path = Path(checkpoint.path)
        if path.is_dir():
            self.largest_checkpoint = max(self.largest_checkpoint, _size(path))
        self._check()

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._check(f" (trial {trial.trial_id} failed writing to it)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._check(f" (trial {trial.trial_id} failed writing to it)")

    def on_step_end(self, iteration, trials, **info) -> None:
        """Tune saves its state (to the staging folder) within a step: keep that save's set."""
        if self.folder is None or time.monotonic() - self._last_keep < self.keep_every_s:
            return
        self._last_keep = time.monotonic()
        source = None
        with contextlib.suppress(AttributeError, IndexError):  # Tune's staging folder for this driver
            source = Path(trials[0].storage.experiment_driver_staging_path)
        keep_good_state(self.folder, source if source is not None and source.is_dir() else None)

    def on_experiment_end(self, trials, **info) -> None:
        if self.full is not None:
            for trial in trials:
                remove_unregistered_checkpoints(trial)


def remove_unregistered_checkpoints(trial: Any) -> list[Path]:
    """Remove the trial's ``checkpoint_*`` folders newer than the last one Ray registered: a copy
    to storage that failed midway leaves one half-written (Ray never restores from it, and the
    resumed trial writes that index again). Returns the folders removed."""
    from .checkpoints import checkpoint_index, local_checkpoints

    folders = local_checkpoints(trial)
    latest = trial.checkpoint  # the last registered checkpoint (None: none yet)
    keep = checkpoint_index(Path(latest.path)) if latest is not None else -1
    if folders is None or keep is None:
        return []
    removed = [path for path in folders if checkpoint_index(path) > keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
