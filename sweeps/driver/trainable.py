"""The Ray Tune trainable: one trial of a sweep, run by :func:`trainer.run_trial`.

A plain top-level function (Ray pickles it to workers). It reports every epoch with the
trial's checkpoint directory and resumes from ``tune.get_checkpoint()``, so a retried trial
continues where it stopped. The GPU ids Ray assigned and the node id travel in each result;
the driver's MLflow callback turns them into tags.

With ``repeats: k`` a trial trains k seeds in lockstep (:mod:`trainer.repeats`): each epoch's
report is the mean over seeds (what the searcher and ASHA see), with every seed's own report in
``seeds``; the checkpoint holds one folder per seed (``seed_<i>/``), and so does the final one.

Tune gets as numbers only the values it schedules on (:func:`scheduling_keys`); the rest of each
report travels packed (:mod:`sweeps.reports`), so Tune's per-trial metric records stay small.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..reports import pack
from ..space import FINAL_KEY, SweepSpec, trial_config_for

__all__ = ["scheduling_keys", "sweep_trainable"]

FINAL_SUMMARY = "final_summary.json"  # in the final checkpoint: that last report, to replay it


def scheduling_keys(sweep: SweepSpec) -> frozenset[str]:
    """The reported numbers Tune reads as numbers: the objectives (scheduler, searcher), their
    best so far, and what ``sweep status`` and the progress lines show. The rest is packed."""
    objectives = sweep.all_metrics
    shown = ("epoch", "epochs_done", "epoch_time_s", "best_epoch", "repeats", "best_seed", FINAL_KEY)
    asha = "last_epoch"  # trainer.loop.LAST_EPOCH (not imported: it imports PyTorch): FinishingASHA's
    return frozenset([*objectives, *(f"best_{m}" for m in objectives), *shown, asha])


def _report(sweep: SweepSpec, values: dict[str, Any], checkpoint_dir: Path) -> None:
    from ray import tune

    tune.report(
        pack(values, scheduling_keys(sweep)), checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir))
    )


def sweep_trainable(config: dict[str, Any], spec: dict[str, Any]) -> None:
    import ray
    from ray import tune

    from trainer import run_trial

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
    if sweep.repeats > 1:
        try:
            _repeated(sweep, cfg, scratch, info, checkpoint)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    try:
        if checkpoint is not None:
            resume_dir = Path(checkpoint.to_directory(str(scratch / "checkpoint")))
            if (resume_dir / FINAL_SUMMARY).is_file():
                # The trial had finished, but the driver died before its experiment state said so:
                # Ray restores it from its final checkpoint. Replay the final report; train nothing.
                summary = json.loads((resume_dir / FINAL_SUMMARY).read_text())
                _report(sweep, summary, resume_dir)
                return

        def report(metrics: dict[str, float], epoch: int, checkpoint_dir: Path) -> None:
            _report(sweep, {**metrics, "epochs_done": epoch + 1, **info}, checkpoint_dir)

        result = run_trial(cfg, report=report, resume_from=resume_dir)
        # The final report: summaries, the best model, and the files the driver uploads to MLflow.
        final_dir = scratch / "final"
        _final_files(result, cfg.output_dir, final_dir)
        summary = _numbers(result)
        summary.update(
            {
                # what the searcher receives: each objective at the trial's best epoch
                **{m: result[f"best_{m}"] for m in sweep.all_metrics},
                "epochs_done": result["epochs_run"],
                "data_access": result["data_access"],
                FINAL_KEY: 1,
                **info,
            }
        )
        (final_dir / FINAL_SUMMARY).write_text(json.dumps(summary))
        _report(sweep, summary, final_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _numbers(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _final_files(result: dict[str, Any], output_dir: Path, final_dir: Path) -> None:
    """A finished trial's files for the driver: plots, resolved config, best model, result, predictions."""
    from trainer.loop import PREDICTIONS_FILE

    (final_dir / "plots").mkdir(parents=True)
    for p in map(Path, result["artifacts"]):
        shutil.copy2(p, final_dir / "plots" / p.name)
    for name in ("config.resolved.yaml", "model.pt", "result.json", PREDICTIONS_FILE):
        shutil.copy2(Path(output_dir) / name, final_dir / name)


def _snapshot(dirs: list[Path], into: Path) -> Path:
    """One checkpoint folder holding every seed's (``seed_<i>/``): hard links where the filesystem
    allows (the trainer replaces its files atomically, so a link keeps this epoch's version)."""
    for i, d in enumerate(dirs):
        try:
            shutil.copytree(d, into / f"seed_{i}", copy_function=os.link)
        except OSError:
            shutil.rmtree(into / f"seed_{i}", ignore_errors=True)
            shutil.copytree(d, into / f"seed_{i}")
    return into


def best_seed(seeds: list[dict[str, float]], metric: str, mode: str) -> int:
    """The index of the seed with the best ``best_<metric>`` (validation), the first on ties."""
    sign = 1.0 if mode == "max" else -1.0
    key = f"best_{metric}"
    scores = [sign * s[key] if math.isfinite(s.get(key, math.nan)) else -math.inf for s in seeds]
    return max(range(len(seeds)), key=lambda i: (scores[i], -i))


def _repeated(sweep: SweepSpec, cfg, scratch: Path, info: dict[str, str], checkpoint) -> None:
    """A configuration trained with ``sweep.repeats`` seeds in lockstep (:mod:`trainer.repeats`):
    Tune sees the mean over seeds every epoch; each seed's own reports travel under ``seeds``."""

    from trainer.repeats import mean_report, run_repeats, seed_configs, seed_summary

    cfgs = seed_configs(cfg, sweep.repeats)
    starts: list[Path | None] = [None] * len(cfgs)
    if checkpoint is not None:
        resume_dir = Path(checkpoint.to_directory(str(scratch / "checkpoint")))
        if (resume_dir / FINAL_SUMMARY).is_file():  # finished before the driver died: replay
            summary = json.loads((resume_dir / FINAL_SUMMARY).read_text())
            _report(sweep, summary, resume_dir)
            return
        starts = [d if (d := resume_dir / f"seed_{i}").is_dir() else None for i in range(len(cfgs))]
    previous: list[Path] = []

    def report(reports: list[dict[str, float]], epoch: int, dirs: list[Path]) -> None:
        snap = _snapshot(dirs, scratch / "snapshots" / f"epoch_{epoch}")
        values = {**mean_report(reports), "epoch": epoch, "epochs_done": epoch + 1, **info}
        _report(sweep, {**values, "seeds": reports}, snap)
        for old in previous:  # stored by now: tune.report persists a checkpoint before it returns
            shutil.rmtree(old, ignore_errors=True)
        previous[:] = [snap]

    results = run_repeats(cfgs, report=report, resume_from=starts)
    final_dir = scratch / "final"
    for i, (c, result) in enumerate(zip(cfgs, results, strict=True)):
        _final_files(result, c.output_dir, final_dir / f"seed_{i}")
    shutil.copy2(cfgs[0].output_dir / "config.resolved.yaml", final_dir / "config.resolved.yaml")
    seeds = [
        {**_numbers(r), "seed": c.train.seed, "data_access": r["data_access"]}
        for c, r in zip(cfgs, results, strict=True)
    ]
    means = seed_summary([_numbers(r) for r in results])
    summary = {
        **means,
        # what the searcher receives: each objective's mean over seeds
        **{m: means[f"best_{m}"] for m in sweep.all_metrics},
        "epochs_done": max(r["epochs_run"] for r in results),
        "data_access": results[0]["data_access"],
        "repeats": len(cfgs),
        "best_seed": best_seed(seeds, sweep.metric, sweep.mode),
        "seeds": seeds,
        FINAL_KEY: 1,
        **info,
    }
    (final_dir / FINAL_SUMMARY).write_text(json.dumps(summary))
    _report(sweep, summary, final_dir)
