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

__all__ = ["localization_logged", "metric_key", "pareto_front", "pareto_runs", "rank_runs", "summary_metrics"]


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


def pareto_front(points: list[tuple[float, ...]], higher: list[bool]) -> list[int]:
    """Indices of the non-dominated ``points``: no other point is at least as good on every
    objective and better on one (``higher[k]``: objective k is maximised). Points with a NaN are
    never on the front; equal points are all kept."""
    signed = [tuple(v if up else -v for v, up in zip(p, higher, strict=True)) for p in points]
    ok = [i for i, p in enumerate(signed) if all(math.isfinite(v) for v in p)]
    front = []
    for i in ok:
        p = signed[i]
        beaten = any(
            all(q >= v for q, v in zip(signed[j], p, strict=True)) and signed[j] != p for j in ok if j != i
        )
        if not beaten:
            front.append(i)
    return front


def pareto_runs(runs: list[RunRow], metrics: list[str]) -> list[RunRow]:
    """The runs on the Pareto front of ``metrics`` (validation), ordered by the first, best first."""
    if len(metrics) < 2:
        raise SelectionError(
            f"--pareto needs two or more metrics; got {', '.join(metrics) or 'none'}: pass "
            "--metric val_f1_macro,val_pointing_game (a multi-objective sweep names its own)"
        )
    keys = [metric_key(m) for m in metrics]
    for key in keys:
        rank_runs(runs, key)  # a metric nobody logged fails here, naming the logged ones
    have = [r for r in runs if all(math.isfinite(r.metrics.get(k, math.nan)) for k in keys)]
    points = [tuple(r.metrics[k] for k in keys) for r in have]
    front = [have[i] for i in pareto_front(points, [higher_is_better(k) for k in keys])]
    return rank_runs(front, keys[0])
