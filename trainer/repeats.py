"""Seed repeats: one configuration trained with k seeds, epoch by epoch in turn, and summarised.

A sweep with ``repeats: k`` runs each sampled configuration as one trial that trains k seeds
(``train.seed``, ``+1``, …). :func:`run_repeats` steps the k trials of :func:`trainer.loop.trial_steps`
in lockstep: every seed trains epoch e, then ``report`` receives the k reports of that epoch, so a
caller can hand the searcher and ASHA one value per configuration and epoch: the mean over seeds
(:func:`mean_report`). Each seed gives exactly what it gives alone (every epoch reseeds). A seed that
stops early keeps its last report in the mean while the others go on.

:func:`seed_summary` turns the k results into the configuration's summary: the mean of every
summary metric, with its standard deviation over seeds and a 95 % Student-t interval of the mean
(cut to the metric's range: with 2 seeds, t = 12.7 and the interval is wide).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TrialConfig

__all__ = [
    "CI_HIGH",
    "CI_LOW",
    "STD",
    "mean_report",
    "metric_range",
    "run_repeats",
    "seed_configs",
    "seed_summary",
    "summarize",
]

STD, CI_LOW, CI_HIGH = "_std", "_ci_low", "_ci_high"  # suffixes of a summary metric's spread
_SPREAD_OF = ("best_val_", "test_")  # the summary metrics that get a spread

RepeatReport = Callable[[list[dict[str, float]], int, list[Path]], None]


def seed_configs(cfg: TrialConfig, repeats: int) -> list[TrialConfig]:
    """The k trials of ``cfg``: seeds ``train.seed + i``, each in ``output_dir/seed_<i>``."""
    out = []
    for i in range(repeats):
        raw = cfg.to_dict()
        raw["name"] = f"{cfg.name}_s{i}"
        raw["output_dir"] = str(Path(cfg.output_dir) / f"seed_{i}")
        raw["train"]["seed"] = cfg.train.seed + i
        out.append(TrialConfig.from_dict(raw, source=f"{cfg.name}: seed {i}"))
    return out


def run_repeats(
    cfgs: list[TrialConfig],
    report: RepeatReport | None = None,
    *,
    resume_from: list[Path | None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``cfgs`` in lockstep; after every epoch call ``report(reports, epoch, checkpoint_dirs)``
    with one report per seed (a stopped seed's last one). Returns the k results, in seed order.

    ``resume_from``: each seed's checkpoint directory given to ``report`` earlier (or None).
    """
    from .loop import last_report, trial_steps

    starts = list(resume_from or [None] * len(cfgs))
    if len(starts) != len(cfgs):
        raise ValueError(f"resume_from: {len(starts)} checkpoints for {len(cfgs)} seeds")
    steps = [trial_steps(c, resume_from=r) for c, r in zip(cfgs, starts, strict=True)]
    last = [last_report(r) if r is not None else None for r in starts]
    dirs: list[Path | None] = [Path(r) if r is not None else None for r in starts]
    results: list[dict[str, Any] | None] = [None] * len(cfgs)
    while any(r is None for r in results):
        epoch = -1
        for i, step in enumerate(steps):
            if results[i] is not None:
                continue
            try:
                last[i], e, dirs[i] = next(step)
            except StopIteration as done:
                results[i] = done.value
                continue
            epoch = max(epoch, e)
        if epoch >= 0 and report is not None:
            # every seed has reported (a seed finishes only after its first epoch)
            report([dict(m) for m in last], epoch, list(dirs))  # type: ignore[arg-type]
    return results  # type: ignore[return-value]


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def mean_report(reports: list[dict[str, Any]]) -> dict[str, float]:
    """The mean over seeds of every number the seeds' reports share (NaNs left out of the mean)."""
    nums = [_numbers(r) for r in reports]
    keys = [k for k in nums[0] if all(k in n for n in nums[1:])]
    return {k: _mean([n[k] for n in nums]) for k in keys}


def metric_range(name: str) -> tuple[float, float]:
    """The values a summary metric can take: an interval of its mean never reaches past them."""
    from .metrics.names import LOCALIZATION_METRICS, METRIC_NAMES, base_name

    base = base_name(name)
    if base == "youden_index":
        return (-1.0, 1.0)
    if base in (*METRIC_NAMES, *LOCALIZATION_METRICS, "cam_in_prior") and base != "discriminant_power":
        return (0.0, 1.0)
    return (-math.inf, math.inf)


def summarize(
    values: list[float], confidence: float = 0.95, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> dict[str, float]:
    """Mean, sample standard deviation and the Student-t interval of the mean of ``values``, the
    interval cut to ``bounds`` (a proportion's mean is in [0, 1] however few the seeds)."""
    from scipy import stats

    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = sum(finite) / n
    if n == 1:
        return {"mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    lo, hi = bounds
    return {"mean": mean, "std": std, "ci_low": max(lo, mean - half), "ci_high": min(hi, mean + half)}


def seed_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """One configuration's summary from its seeds' results: every shared number as its mean, and
    each ``best_val_*`` / ``test_*`` metric also with ``_std``, ``_ci_low`` and ``_ci_high``."""
    nums = [_numbers(r) for r in results]
    keys = [k for k in nums[0] if all(k in n for n in nums[1:])]
    out: dict[str, float] = {}
    for k in keys:
        s = summarize([n[k] for n in nums], bounds=metric_range(k))
        out[k] = s["mean"]
        if k.startswith(_SPREAD_OF):
            out |= {k + STD: s["std"], k + CI_LOW: s["ci_low"], k + CI_HIGH: s["ci_high"]}
    return out
