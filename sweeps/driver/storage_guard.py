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

Ray writes its experiment state into storage in place (not to a temporary file first): a disk that
fills while it writes leaves it truncated, and Ray cannot restore from it. Before each of Tune's
state saves the guard keeps a copy of the state files that are whole (:data:`GOOD_STATE_DIR`);
:func:`repair_state`, run by ``sweep resume``, puts a truncated one back from that copy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickletools
import shutil
import signal
from pathlib import Path
from typing import Any

from ray.tune import Callback

__all__ = [
    "GOOD_STATE_DIR",
    "RESERVE_MB",
    "StorageFull",
    "StorageGuard",
    "keep_good_state",
    "remove_unregistered_checkpoints",
    "repair_state",
]

RESERVE_MB = float(os.environ.get("CXR_STORAGE_RESERVE_MB", "32"))
GOOD_STATE_DIR = ".state-last-good"  # in the sweep folder: the last whole copy of Ray's state files
_STATE_GLOBS = ("experiment_state-*.json", "*-state-*.json", "*-state-*.pkl", "searcher-state-*.pkl")


class StorageFull(OSError):
    """The sweep's storage ran out of space (raised where Tune's stop signal cannot be used)."""


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


def _state_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in _STATE_GLOBS for p in folder.glob(pattern) if p.is_file()})


def keep_good_state(folder: Path) -> None:
    """Copy Ray's state files in ``folder`` that are whole (and changed) into :data:`GOOD_STATE_DIR`
    (temporary file, then rename; a failed copy leaves the previous one)."""
    good = folder / GOOD_STATE_DIR
    for path in _state_files(folder):
        kept = good / path.name
        with contextlib.suppress(OSError):
            st = path.stat()
            if (
                kept.exists()
                and kept.stat().st_mtime_ns == st.st_mtime_ns
                and kept.stat().st_size == st.st_size
            ):
                continue
            if not _whole(path):
                continue
            good.mkdir(exist_ok=True)
            tmp = good / f".{path.name}.tmp"
            try:
                shutil.copy2(path, tmp)
                os.replace(tmp, kept)
            finally:
                tmp.unlink(missing_ok=True)


def repair_state(folder: Path) -> list[str]:
    """Put back, from :data:`GOOD_STATE_DIR`, each of Ray's state files in ``folder`` that is not
    whole (a disk that filled while Ray wrote it). Returns the names put back."""
    good = Path(folder) / GOOD_STATE_DIR
    repaired = []
    for kept in _state_files(good):
        live = Path(folder) / kept.name
        if not _whole(live) and _whole(kept):
            shutil.copy2(kept, live)
            repaired.append(kept.name)
    return repaired


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

    def get_state(self) -> None:
        """Tune is about to save its state (and write it into storage): keep the whole copy first."""
        if self.folder is not None:
            keep_good_state(self.folder)

    def on_experiment_end(self, trials, **info) -> None:
        if self.full is not None:
            for trial in trials:
                remove_unregistered_checkpoints(trial)


def remove_unregistered_checkpoints(trial: Any) -> list[Path]:
    """Remove the trial's ``checkpoint_*`` folders newer than the last one Ray registered: a copy
    to storage that failed midway leaves one half-written (Ray never restores from it, and the
    resumed trial writes that index again). Returns the folders removed."""
    storage = getattr(trial, "storage", None)
    if storage is None or type(storage.storage_filesystem).__name__ != "LocalFileSystem":
        return []
    folder = Path(storage.trial_fs_path)
    latest = trial.checkpoint  # the last registered checkpoint (None: none yet)
    keep = int(Path(latest.path).name.split("_")[-1]) if latest is not None else -1
    removed = []
    for path in sorted(folder.glob("checkpoint_*")):
        try:
            index = int(path.name.split("_")[-1])
        except ValueError:
            continue
        if index > keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
