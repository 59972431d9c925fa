"""A searcher's draws, replayed: the Ray trial config a run stored (tag ``cxr.search_config``) →
Optuna parameters with the distributions of a sweep's own space (:class:`sweeps.space.OptunaSpace`).

What warm starts (``search.warm_start``) and hyperparameter importance (``report``) build their
Optuna trials from. A draw the space could not have made (a value outside a range, a choice it
does not offer) replays as None.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

__all__ = ["flat_draw", "replay_draws"]


def flat_draw(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A Ray trial config → Optuna parameter names (nested keys joined by ``/``, as Ray does)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_draw(v, f"{name}/"))
        else:
            out[name] = v
    return out


def replay_draws(points: list[dict[str, Any]], params: dict[str, Any] | None):
    """Each point's (params, distributions): through the sweep's space where given, else inferred."""
    import optuna

    if params is None:
        return _inferred(points)
    from .space import OptunaSpace

    space = OptunaSpace(params)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an enqueued value outside the space: detected below
        for point in points:
            study.enqueue_trial(point, skip_if_exists=False)
            trial = study.ask()
            try:
                space(trial)
                same = all(point.get(k) == v for k, v in trial.params.items())
                # an enqueued value outside a distribution is kept (with a warning): refuse it here
                optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, value=0.0)
            except ValueError:
                same = False
            out.append((dict(trial.params), dict(trial.distributions)) if same else None)
            # never told: a scratch study (a FAIL would be checked against the distributions)
    return out


def _inferred(points: list[dict[str, Any]]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    names = {k for p in points for k in p}
    dists = {}
    for name in names:
        values = [p[name] for p in points if name in p]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            low, high = float(min(values)), float(max(values))
            dists[name] = FloatDistribution(low, high if high > low else low + 1e-12)
        else:
            dists[name] = CategoricalDistribution(sorted({json.dumps(v) for v in values}))
    out = []
    for p in points:
        values = {
            k: (float(v) if isinstance(dists[k], FloatDistribution) else json.dumps(v)) for k, v in p.items()
        }
        out.append((values, {k: dists[k] for k in p}))
    return out
