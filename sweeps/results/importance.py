"""Which searched settings matter for the sweep metric: Optuna's fANOVA over the finished trials.

Every trial run stores the values its searcher drew (tag ``cxr.search_config``: the Ray trial
config, for Optuna, random and grid search alike). Replayed through the sweep's own Optuna space
(:class:`sweeps.space.OptunaSpace`) they become Optuna trials with the space's distributions
(λ's branch, t, τ, lr, mode, …) and the run's validation score, and
:class:`optuna.importance.FanovaImportanceEvaluator` splits the score's variance among them.

Optuna's rule applies: a parameter counts only where every finished trial drew it (the λ value
of fixed-λ trials is left out of a sweep that also ran schedules; ``attention.tau`` of a sweep
whose energy-mode trials do not draw it). Left-out parameters are named. Without the sweep's
saved spec at hand the distributions are read off the values (uniform between the extremes).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from trainer.metrics import higher_is_better

from ..draws import flat_draw, replay_draws
from ..tracking.lookup import RunRow
from ..tracking.runs import SEARCH_CONFIG_TAG
from .select import metric_key

__all__ = ["MIN_TRIALS", "Importance", "param_importance", "param_label", "saved_params"]

MIN_TRIALS = 8  # fewer, and a forest of them says nothing


@dataclass
class Importance:
    """fANOVA importances (summing to 1) of the parameters every finished trial drew."""

    metric: str
    n_trials: int
    values: dict[str, float] = field(default_factory=dict)  # Optuna name → share of variance
    left_out: list[str] = field(default_factory=list)  # drawn by some trials only
    note: str = ""  # why there are no values, when there are none

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "n_trials": self.n_trials,
            "importance": self.values,
            "left_out": self.left_out,
            "note": self.note,
        }


def param_importance(runs: list[RunRow], metric: str, params: dict[str, Any] | None = None) -> Importance:
    """fANOVA importance of the searched parameters for ``metric`` (validation, as selection reads it)
    over ``runs``; ``params``: the sweep's searched parameters (its saved spec), if at hand."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "a new study created" lines
    key = metric_key(metric)
    have = [r for r in runs if SEARCH_CONFIG_TAG in r.tags and math.isfinite(r.metrics.get(key, math.nan))]
    result = Importance(key, len(have))
    if len(have) < MIN_TRIALS:
        without = len(runs) - len(have)
        result.note = (
            f"{len(have)} finished trials with {key} and their drawn values: fANOVA needs {MIN_TRIALS}"
        )
        if without:
            result.note += f" ({without} runs have no {SEARCH_CONFIG_TAG} tag: logged before this version)"
        return result
    points = [flat_draw(json.loads(r.tags[SEARCH_CONFIG_TAG])) for r in have]
    replayed = replay_draws(points, params)
    kept = [(r, rp) for r, rp in zip(have, replayed, strict=True) if rp is not None]
    result.n_trials = len(kept)
    if len(kept) < MIN_TRIALS:
        result.note = f"{len(kept)} trials lie in the sweep's space: fANOVA needs {MIN_TRIALS}"
        return result
    direction = "maximize" if higher_is_better(key) else "minimize"
    study = optuna.create_study(direction=direction)
    study.add_trials(
        optuna.trial.create_trial(params=p, distributions=d, value=r.metrics[key]) for r, (p, d) in kept
    )
    names = set.intersection(*(set(p) for _, (p, _) in kept))
    result.left_out = sorted(set().union(*(set(p) for _, (p, _) in kept)) - names)
    varied = [n for n in sorted(names) if len({json.dumps(p[n]) for _, (p, _) in kept}) > 1]
    if not varied:
        result.note = "no searched parameter took more than one value in every trial"
        return result
    if len({r.metrics[key] for r, _ in kept}) == 1:
        result.note = f"every trial scored the same {key}: there is no variance to attribute"
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=varied)
    result.values = {k: float(v) for k, v in got.items()}
    return result


def param_label(name: str) -> str:
    """An Optuna name as a reader knows it: ``attention.lambda/kind`` → ``attention.lambda (fixed or
    schedule)``, ``attention.lambda/adaptive/slope`` → ``attention.lambda adaptive slope``."""
    head, _, rest = name.partition("/")
    if rest == "kind":
        return f"{head} (fixed or schedule)"
    if rest == "value":
        return f"{head} (fixed value)"
    return " ".join([head, *rest.split("/")]) if rest else head


def saved_params(tracking_uri: str, parent_run_id: str) -> dict[str, Any] | None:
    """The searched parameters of the sweep of ``parent_run_id``, from its saved spec (the parent's
    ``cxr.sweep_dir`` tag) where that folder is readable here; else None."""
    from mlflow.tracking import MlflowClient

    from ..space import load_saved_spec

    folder = MlflowClient(tracking_uri).get_run(parent_run_id).data.tags.get("cxr.sweep_dir", "")
    if not folder or "://" in folder:
        return None
    try:
        spec, _ = load_saved_spec(folder)
    except Exception:  # moved or deleted: infer the distributions instead
        return None
    return dict(spec.params)
