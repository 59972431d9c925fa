"""The accuracy-vs-localization front of a multi-objective sweep, drawn: every finished
configuration at its validation scores on the first two objectives, the Pareto front joined, the
cross-entropy baseline (λ = 1) marked, and each point's 95 % interval over seeds where the sweep
had seed repeats (the configuration runs' ``_ci_low`` / ``_ci_high``)."""

from __future__ import annotations

import math
from pathlib import Path

from trainer.metrics import metric_label

from ..tracking.lookup import RunRow
from .select import metric_key, pareto_runs
from .tables import save_png

__all__ = ["front_chart"]


def _is_ce(run: RunRow) -> bool:
    try:
        return float(run.params.get("attention.lambda", "nan")) == 1.0
    except ValueError:
        return False


def front_chart(runs: list[RunRow], metrics: list[str], path: Path) -> Path:
    """``path`` (PNG): the runs on the first two of ``metrics``, the front highlighted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kx, ky = metric_key(metrics[0]), metric_key(metrics[1])
    front = {r.run_id for r in pareto_runs(runs, metrics)}
    have = [r for r in runs if all(math.isfinite(r.metrics.get(k, math.nan)) for k in (kx, ky))]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))

    def err(r: RunRow, key: str) -> list[list[float]] | None:
        lo, hi = r.metrics.get(f"{key}_ci_low"), r.metrics.get(f"{key}_ci_high")
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        return [[r.metrics[key] - lo], [hi - r.metrics[key]]]

    for r in have:
        on = r.run_id in front
        x, y = r.metrics[kx], r.metrics[ky]
        ax.errorbar(
            x,
            y,
            xerr=err(r, kx),
            yerr=err(r, ky),
            fmt="*" if _is_ce(r) else "o",
            ms=13 if _is_ce(r) else 7,
            color="tab:red" if on else "0.55",
            mfc=("tab:red" if on else "white") if not _is_ce(r) else "gold",
            mec="black" if _is_ce(r) else ("tab:red" if on else "0.55"),
            elinewidth=0.8,
            capsize=2,
            zorder=3 if on else 2,
        )
        if _is_ce(r):
            ax.annotate("CE (λ = 1)", (x, y), textcoords="offset points", xytext=(8, -12), fontsize=8)
    line = sorted((r.metrics[kx], r.metrics[ky]) for r in have if r.run_id in front)
    if len(line) > 1:
        ax.plot(*zip(*line, strict=True), color="tab:red", lw=1, zorder=1, label="Pareto front")
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(f"{metric_label(kx.removeprefix('best_val_'))} (validation)")
    ax.set_ylabel(f"{metric_label(ky.removeprefix('best_val_'))} (validation)")
    extra = f"; {len(metrics) - 2} more objective(s) not drawn" if len(metrics) > 2 else ""
    bars = "; bars: 95 % interval over seeds" if any(err(r, kx) for r in have) else ""
    ax.set_title(f"{len(front)} of {len(have)} configurations on the front{bars}{extra}", fontsize=9)
    ax.grid(alpha=0.3)
    return save_png(fig, path)
