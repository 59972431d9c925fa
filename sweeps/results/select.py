"""Choose the best configuration of a sweep from its runs — on validation metrics only.

Selection ranks finished trial runs (:func:`sweeps.tracking.lookup.find_runs`) by one
``best_val_*`` metric, in that metric's direction. Test metrics are shown, never used to choose.
Ties are broken deterministically: by the Ray trial id (creation order within a sweep), then the
run name, then the run id.
"""

from __future__ import annotations

import math

from trainer.metrics import LOCALIZATION_METRICS, METRIC_NAMES, higher_is_better

from ..tracking.lookup import RunRow, SelectionError

__all__ = ["localization_logged", "metric_key", "rank_runs", "summary_metrics"]


def metric_key(metric: str) -> str:
    """``f1_macro`` / ``val_f1_macro`` / ``best_val_f1_macro`` → ``best_val_f1_macro``."""
    name = metric.strip()
    if name.startswith("test_"):
        raise SelectionError(
            f"--metric {metric!r}: selection uses validation metrics only (best_val_*), never test ones"
        )
    for prefix in ("best_val_", "val_"):
        if name.startswith(prefix):
            name = name.removeprefix(prefix)
            break
    return f"best_val_{name}"


def rank_runs(runs: list[RunRow], metric: str) -> list[RunRow]:
    """``runs`` that logged ``metric`` (a validation metric), best first, ties broken deterministically."""
    key = metric_key(metric)
    have = [r for r in runs if key in r.metrics and math.isfinite(r.metrics[key])]
    if not have:
        logged = sorted({k for r in runs for k in r.metrics if k.startswith("best_val_")})
        raise SelectionError(
            f"--metric {metric!r}: {key} was never logged by these runs; "
            f"logged: {', '.join(logged) or 'none'}"
        )
    sign = -1.0 if higher_is_better(key) else 1.0
    return sorted(have, key=lambda r: (sign * r.metrics[key], r.trial_id, r.run_name, r.run_id))


def localization_logged(runs: list[RunRow]) -> list[str]:
    """The localization scores (pointing game, CAM in lesion) that any of ``runs`` logged on test."""
    return [m for m in LOCALIZATION_METRICS if any(f"test_{m}" in r.metrics for r in runs)]


def summary_metrics(runs: list[RunRow]) -> list[str]:
    """The test metric names a table shows: §5's, plus localization scores where any run logged them."""
    return [*METRIC_NAMES, *localization_logged(runs)]
