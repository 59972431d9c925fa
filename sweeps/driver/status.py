"""A sweep's trials as rows: state, searched values, best metric, epochs, GPU ids and node.

Rows come from a Ray ``ResultGrid``: the one a finished ``run_sweep`` returns, or the one read
back from the experiment state in storage (:func:`read_status`, ``cxr-sweep sweep status``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

from ..space import FINAL_KEY, SweepSpec, load_saved_spec, searched_values, sweep_dir

__all__ = ["read_status", "sweep_rows"]


def sweep_rows(results, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial of a Ray ``ResultGrid``: state, searched values, best metric, GPU ids."""
    rows = []
    for r in results:
        m = r.metrics or {}
        if r.error is not None:
            state = "ERROR"
        elif m.get(FINAL_KEY):
            state = "DONE"
        elif m:
            state = "STOPPED"  # by ASHA, or still running when read during a sweep
        else:
            state = "PENDING"
        best = m.get(f"best_{spec.metric}", m.get(spec.metric, float("nan")))
        rows.append(
            {
                "trial": str(m.get("trial_id") or (Path(r.path).name if r.path else "?")),
                "path": r.path,
                "state": state,
                "params": searched_values(spec, r.config or {}),
                "best": float(best) if best is not None else float("nan"),
                "epochs": int(m.get("epochs_done", 0)),
                "gpu_ids": m.get("gpu_ids", ""),
                "node_id": str(m.get("node_id", ""))[:8],
                "error": str(r.error)[:200] if r.error is not None else "",
            }
        )
    return rows


def read_status(name_or_path: str, storage: str | Path | None = None):
    """The spec and per-trial rows of a sweep, read from Ray's experiment state on storage."""
    from ray import tune

    from .trainable import sweep_trainable

    spec, _ = load_saved_spec(name_or_path, storage)
    if not tune.Tuner.can_restore(sweep_dir(spec)):
        raise ConfigError(f"{sweep_dir(spec)}: no Ray experiment state yet")
    tuner = tune.Tuner.restore(sweep_dir(spec), trainable=sweep_trainable)
    return spec, sweep_rows(tuner.get_results(), spec)
