"""cxr-attention-sweeps: sweeps of :mod:`trainer` trials on Ray Tune, tracked in MLflow.

Layers, each importing only those below it (docs/architecture.md):

- :mod:`sweeps.cli` — the ``cxr-sweep`` commands;
- :mod:`sweeps.results` — selection, reports, export, predict, the MLflow UI (beside the driver:
  neither imports the other);
- :mod:`sweeps.driver` — the orchestration: checks before any trial, Ray and the Tuner, the
  trainable each trial runs, the run and its resume, the trials' status;
- :mod:`sweeps.tracking` — everything MLflow: the store, a run's logging, the parent run, the
  driver's callback, run lookup;
- :mod:`sweeps.space` and :mod:`sweeps.params` — a sweep file, validated, and its searched
  parameters as Ray / Optuna spaces and trial overrides.

The public API below loads lazily: ``import sweeps`` imports neither Ray nor MLflow.

    >>> from sweeps import run_sweep, find_runs, rank_runs
    >>> outcome = run_sweep("search_spaces/demo.yaml", overrides=["trial.train.epochs=1"])
    >>> best = rank_runs(find_runs([outcome.name], storage="demo-output/sweeps").runs, "val_f1_macro")[0]
"""

from __future__ import annotations

from trainer.lazy import lazy_exports

__all__ = [
    "SweepSpec",
    "export_model",
    "find_runs",
    "load_saved_spec",
    "load_sweep",
    "predict_folder",
    "rank_runs",
    "read_status",
    "resume_sweep",
    "run_sweep",
]

_WHERE = {
    "SweepSpec": "sweeps.space",
    "load_sweep": "sweeps.space",
    "load_saved_spec": "sweeps.space",
    "run_sweep": "sweeps.driver",
    "resume_sweep": "sweeps.driver",
    "read_status": "sweeps.driver.status",
    "find_runs": "sweeps.tracking.lookup",
    "rank_runs": "sweeps.results.select",
    "export_model": "sweeps.results.export",
    "predict_folder": "sweeps.results.predict",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
