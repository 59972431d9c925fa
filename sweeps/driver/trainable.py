"""The Ray Tune trainable: one trial of a sweep, run by :func:`trainer.run_trial`.

A plain top-level function (Ray pickles it to workers). It reports every epoch with the
trial's checkpoint directory and resumes from ``tune.get_checkpoint()``, so a retried trial
continues where it stopped. The GPU ids Ray assigned and the node id travel in each result;
the driver's MLflow callback turns them into tags.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..space import FINAL_KEY, SweepSpec, trial_config_for

__all__ = ["sweep_trainable"]

FINAL_SUMMARY = "final_summary.json"  # in the final checkpoint: that last report, to replay it


def sweep_trainable(config: dict[str, Any], spec: dict[str, Any]) -> None:
    import ray
    from ray import tune

    from trainer import run_trial
    from trainer.loop import PREDICTIONS_FILE

    sweep = SweepSpec.model_validate(spec)
    ctx = tune.get_context()
    # Work in node-local scratch: Ray syncs the trial dir to storage in the background, and files
    # being written there race that sync. What must persist travels in checkpoints instead.
    scratch = Path(tempfile.mkdtemp(prefix=f"cxr-{sweep.name}-{ctx.get_trial_id()}-"))
    cfg = trial_config_for(sweep, config, ctx.get_trial_name(), str(scratch / "trial"))
    info = {
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "node_id": ray.get_runtime_context().get_node_id(),
    }

    resume_dir = None
    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is not None:
            resume_dir = Path(checkpoint.to_directory(str(scratch / "checkpoint")))
            if (resume_dir / FINAL_SUMMARY).is_file():
                # The trial had finished, but the driver died before its experiment state said so:
                # Ray restores it from its final checkpoint. Replay the final report; train nothing.
                summary = json.loads((resume_dir / FINAL_SUMMARY).read_text())
                tune.report(summary, checkpoint=tune.Checkpoint.from_directory(str(resume_dir)))
                return

        def report(metrics: dict[str, float], epoch: int, checkpoint_dir: Path) -> None:
            tune.report(
                {**metrics, "epochs_done": epoch + 1, **info},
                checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)),
            )

        result = run_trial(cfg, report=report, resume_from=resume_dir)
        # The final report: summaries, the best model, and the files the driver uploads to MLflow.
        final_dir = scratch / "final"
        (final_dir / "plots").mkdir(parents=True)
        for p in map(Path, result["artifacts"]):
            shutil.copy2(p, final_dir / "plots" / p.name)
        for name in ("config.resolved.yaml", "model.pt", "result.json", PREDICTIONS_FILE):
            shutil.copy2(cfg.output_dir / name, final_dir / name)
        summary = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        summary.update(
            {
                sweep.metric: result[f"best_{sweep.metric}"],
                "epochs_done": result["epochs_run"],
                "data_access": result["data_access"],
                FINAL_KEY: 1,
                **info,
            }
        )
        (final_dir / FINAL_SUMMARY).write_text(json.dumps(summary))
        tune.report(summary, checkpoint=tune.Checkpoint.from_directory(str(final_dir)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
