"""A resume from Ray state that names a checkpoint Ray already deleted (``num_to_keep``).

Ray deletes a trial's old checkpoints when it registers a new one, but saves the state that names
the latest only now and then; a driver that dies in between leaves state naming a deleted
checkpoint. One ``make test`` beside another suite lost the stack's resumed trial that way
(``Could not recover from checkpoint as it does not exist on storage anymore``). Here the state
of an early step is put back after the run, as a driver that died then would have left it."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

from sweeps.driver import checkpoints
from sweeps.driver.checkpoints import MissingCheckpoints, whole_checkpoint
from sweeps.driver.storage_guard import state_files


def _write_checkpoint(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "progress.json").write_text(json.dumps({"n": n}))
    with zipfile.ZipFile(folder / "state.pt", "w") as z:
        z.writestr("archive/data.pkl", b"x" * 2000)


def test_a_checkpoint_is_whole_only_with_complete_archives_and_json(tmp_path):
    good = tmp_path / "good"
    _write_checkpoint(good, 1)
    assert whole_checkpoint(good)
    cut = tmp_path / "cut"
    _write_checkpoint(cut, 1)
    data = (cut / "state.pt").read_bytes()
    (cut / "state.pt").write_bytes(data[: len(data) // 2])
    assert not whole_checkpoint(cut)
    bad_json = tmp_path / "json"
    _write_checkpoint(bad_json, 1)
    (bad_json / "progress.json").write_text('{"n": ')
    assert not whole_checkpoint(bad_json)
    (tmp_path / "empty").mkdir()
    assert not whole_checkpoint(tmp_path / "empty")


def test_a_resumed_trial_whose_named_checkpoint_was_deleted_continues_from_its_newest(
    local_ray, tmp_path, monkeypatch
):
    from ray import tune

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")  # Ray saves its state at every step
    limit = tmp_path / "limit"
    limit.write_text("8")
    snap = tmp_path / "snapshot"

    def counting(config):  # reports n = 1, 2, ... up to the number in the limit file
        import tempfile
        import time

        from ray import tune

        ckpt = tune.get_checkpoint()
        n = json.loads((Path(ckpt.path) / "progress.json").read_text())["n"] if ckpt else 0
        while n < int(Path(config["limit"]).read_text()):
            n += 1
            time.sleep(0.05)  # a pace Ray reports at one by one, as from a real epoch
            folder = Path(tempfile.mkdtemp())
            _write_checkpoint(folder, n)
            tune.report({"n": n}, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    class Snapshot(tune.Callback):
        """Keeps Ray's state of the first step whose latest checkpoint is checkpoint_000002 or a later
        one Ray deletes before the run ends (one step can take in several results Ray buffered)."""

        def on_step_end(self, iteration, trials, **info):
            ckpt = trials[0].checkpoint if trials else None
            if snap.exists() or ckpt is None or not 2 <= int(ckpt.path.rsplit("_", 1)[-1]) <= 5:
                return
            snap.mkdir()
            for path in state_files(Path(trials[0].storage.experiment_driver_staging_path)):
                shutil.copy2(path, snap / path.name)

    tune.Tuner(
        counting,
        param_space={"limit": str(limit)},
        run_config=tune.RunConfig(
            name="exp",
            storage_path=str(tmp_path / "storage"),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[MissingCheckpoints(), Snapshot()],
            verbose=0,
        ),
    ).fit()
    exp = tmp_path / "storage" / "exp"
    (trial_dir,) = [p for p in exp.iterdir() if p.is_dir() and p.name.startswith("counting")]
    assert sorted(p.name for p in trial_dir.glob("checkpoint_*")) == [
        "checkpoint_000006",
        "checkpoint_000007",
    ]
    assert snap.is_dir(), "no step saw checkpoint_000002 to _000005 as the latest"
    # the driver "died" at that step: its state names checkpoint_00000[2-5] (deleted since), and the
    # copy of checkpoint_000008 to storage was cut short
    for path in state_files(exp):
        path.unlink()
    for path in snap.iterdir():
        shutil.copy2(path, exp / path.name)
    _write_checkpoint(trial_dir / "checkpoint_000008", 99)
    state = trial_dir / "checkpoint_000008" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    shutil.copytree(exp, tmp_path / "control")
    limit.write_text("10")

    result = tune.Tuner.restore(str(exp), trainable=counting, resume_errored=True).fit()[0]
    assert result.error is None, result.error
    assert result.metrics["n"] == 10
    # 8 reports before, each with a checkpoint: Ray's count goes on from there, and so do its folders
    assert result.metrics["training_iteration"] == 10
    assert Path(result.checkpoint.path).name == "checkpoint_000009"
    # the cut-short folder was removed and written again, whole, by the continued trial
    assert whole_checkpoint(trial_dir / "checkpoint_000008")
    assert json.loads((trial_dir / "checkpoint_000008" / "progress.json").read_text()) == {"n": 9}

    # without the repair, Ray restores from the deleted checkpoint and the trial fails: the case is real
    monkeypatch.setattr(checkpoints, "continue_from_newest", lambda trial: None)
    control = tune.Tuner.restore(str(tmp_path / "control"), trainable=counting, resume_errored=True)
    failed = control.fit()[0]
    assert failed.error is not None and "does not exist on storage anymore" in str(failed.error)
