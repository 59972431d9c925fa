"""A resumed trial whose last checkpoint, as Ray's saved state names it, was already deleted.

Ray keeps a trial's newest ``num_to_keep`` checkpoints and deletes the older ones as soon as it
registers a new one, but it saves its experiment state (which names the trial's latest checkpoint)
only now and then: at most every ~10 s, and when a trial has checkpointed ``num_to_keep`` times since
the last save. A driver that dies in between (a head restart, a killed ``sweep resume``) leaves state
naming a checkpoint that is gone, while newer ones of the same trial are on storage. Restored from
that state, Ray restarts the trial from the missing checkpoint, fails ``Could not recover from
checkpoint as it does not exist on storage anymore`` on every retry, and the trial is lost. One
``make test`` beside another suite lost the stack's resumed sweep this way.

:class:`MissingCheckpoints`, a Tune callback, looks once, before any trial of the run starts: a
trial whose latest checkpoint is missing from (local or shared) storage continues from the newest
whole checkpoint folder it has there instead. Whole: every ``.pt`` in it is a complete zip (torch's
format; its CRCs are read, nothing is unpickled) and every ``.json`` parses; a newer folder that is
not whole (its copy cut short) is removed, as Ray writes that index again. A trial with no whole
checkpoint is left to Ray's own error.

The continued trial's training iteration is the missing checkpoint's plus the folders between them:
each report of :func:`~sweeps.driver.trainable.sweep_trainable` carries a checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

from ray.tune import Callback

__all__ = [
    "MissingCheckpoints",
    "checkpoint_index",
    "continue_from_newest",
    "local_checkpoints",
    "whole_checkpoint",
]

log = logging.getLogger(__name__)


def checkpoint_index(path: Path) -> int | None:
    """The index of Ray's checkpoint folder ``path`` (``checkpoint_000007``: 7); None for another name."""
    try:
        return int(path.name.split("_")[-1]) if path.name.startswith("checkpoint_") else None
    except ValueError:
        return None


def local_checkpoints(trial: Any) -> list[Path] | None:
    """The trial's checkpoint folders on storage, oldest first; None where its storage is not a local
    (or shared) filesystem, such as S3, whose folders the driver does not list."""
    storage = getattr(trial, "storage", None)
    if storage is None or type(storage.storage_filesystem).__name__ != "LocalFileSystem":
        return None
    found = (p for p in Path(storage.trial_fs_path).glob("checkpoint_*") if checkpoint_index(p) is not None)
    return sorted(found, key=checkpoint_index)


def whole_checkpoint(folder: Path) -> bool:
    """Whether checkpoint ``folder`` was written whole: it holds a ``.pt`` or ``.json`` file, every
    ``.pt`` is a complete zip archive and every ``.json`` parses (nothing in it is loaded)."""
    files = [p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".pt", ".json")]
    try:
        for path in files:
            if path.suffix == ".json":
                json.loads(path.read_text())
            else:
                with zipfile.ZipFile(path) as z:
                    if z.testzip() is not None:
                        return False
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
    return bool(files)


def continue_from_newest(trial: Any) -> Path | None:
    """If ``trial``'s latest checkpoint is missing from local storage, make the newest whole
    checkpoint folder of the trial its latest one (and remove newer folders that are not whole).
    Returns that folder; None where nothing was changed."""
    from ray.tune import Checkpoint

    latest = trial.checkpoint
    if latest is None or Path(latest.path).exists():
        return None
    folders = local_checkpoints(trial)
    if folders is None:
        return None
    named = checkpoint_index(Path(latest.path))
    found = None
    for folder in reversed(folders):
        if whole_checkpoint(folder):
            found = folder
            break
    if found is None or named is None or checkpoint_index(found) < named:
        log.warning(
            "trial %s: its last checkpoint %s is missing and no newer whole one is on storage",
            trial.trial_id,
            latest.path,
        )
        return None
    for folder in folders:
        if checkpoint_index(folder) > checkpoint_index(found):
            shutil.rmtree(folder, ignore_errors=True)
    manager = trial.run_metadata.checkpoint_manager
    result = manager.latest_checkpoint_result
    metrics = dict(result.metrics)
    if "training_iteration" in metrics:
        metrics["training_iteration"] += checkpoint_index(found) - named
    # the missing ones leave Ray's list first: Ray would otherwise try (and fail) to delete them
    manager._checkpoint_results = [r for r in manager._checkpoint_results if Path(r.checkpoint.path).exists()]
    # a result of Ray's own type (its _TrainingResult): a checkpoint and the metrics reported with it
    manager.register_checkpoint(
        type(result)(checkpoint=Checkpoint(str(found), latest.filesystem), metrics=metrics)
    )
    trial.storage.current_checkpoint_index = checkpoint_index(
        found
    )  # the next checkpoint is written after it
    trial.invalidate_json_state()
    trial.run_metadata.invalidate_cache()
    log.warning(
        "trial %s: its last checkpoint %s was deleted before Ray saved its state; it continues from %s",
        trial.trial_id,
        Path(latest.path).name,
        found.name,
    )
    return found


class MissingCheckpoints(Callback):
    """Before the first step of a run (a resume: Ray's restored trials), every trial whose latest
    checkpoint is missing continues from its newest whole one (:func:`continue_from_newest`)."""

    def __init__(self) -> None:
        self.done = False

    # pickled with the experiment (Tuner.restore brings the callbacks back): a restored one looks again
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self.done:
            return
        self.done = True
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                continue
            continue_from_newest(trial)
