"""Warm start (``search.warm_start: OTHER_SWEEP``): an earlier sweep's finished configurations and
their validation scores, read from MLflow, as completed Optuna trials of this sweep's searcher.

Each finished trial run of the other sweep stored what its searcher drew (tag
``cxr.search_config``). The draws are replayed through *this* sweep's space
(:func:`sweeps.draws.replay_draws`): a draw this space could not make (another range, a setting it
does not search) is skipped and counted. The score is the run's ``best_val_<metric>`` of this
sweep's metric (a configuration with seed repeats: the mean over its seeds). The trials go into the
Optuna study before the first suggestion (``OptunaSearch(storage=...)`` loads the study), so TPE's
start-up trials and its model count them; Ray's ``evaluated_rewards`` cannot do this for a
define-by-run space.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..draws import flat_draw, replay_draws
from ..space import SweepSpec
from ..tracking.lookup import SelectionError, find_runs
from ..tracking.runs import SEARCH_CONFIG_TAG

__all__ = ["WarmStart", "warm_start", "warm_storage"]

STUDY_NAME = "optuna"  # the study OptunaSearch opens (its fixed name for in-memory storage)


@dataclass
class WarmStart:
    """The earlier sweep's trials this sweep's searcher starts from."""

    source: str
    trials: list[tuple[dict[str, Any], dict[str, Any], list[float]]] = field(default_factory=list)
    skipped: int = 0  # finished runs whose draw lies outside this sweep's space
    untagged: int = 0  # finished runs logged before draws were stored

    def describe(self) -> str:
        text = f"warm start: {len(self.trials)} finished configurations of sweep {self.source!r}"
        text += " seed the searcher"
        notes = []
        if self.skipped:
            notes.append(f"{self.skipped} outside this sweep's space skipped")
        if self.untagged:
            notes.append(f"{self.untagged} without their drawn values ({SEARCH_CONFIG_TAG}) skipped")
        return text + (f" ({'; '.join(notes)})" if notes else "")


def warm_start(spec: SweepSpec, tracking_uri: str) -> WarmStart | None:
    """The warm start of ``spec`` from its tracking store, or None without ``search.warm_start``.

    Bad input fails before any run is opened: an unknown sweep, one with no finished runs, none
    that logged this sweep's metric or lies in this sweep's space."""
    source = spec.search.warm_start
    if not source:
        return None
    where = f"search.warm_start {source!r}"
    try:
        found = find_runs([source], tracking_uri=tracking_uri)
    except SelectionError as e:
        raise SelectionError(f"{where}: {e}") from None
    keys = [f"best_{m}" for m in spec.all_metrics]  # a multi-objective sweep: every objective
    scored = [r for r in found.runs if all(math.isfinite(r.metrics.get(k, math.nan)) for k in keys)]
    if not scored:
        raise SelectionError(f"{where}: none of its {len(found.runs)} finished runs logged {', '.join(keys)}")
    tagged = [r for r in scored if SEARCH_CONFIG_TAG in r.tags]
    out = WarmStart(source, untagged=len(scored) - len(tagged))
    replayed = replay_draws(
        [flat_draw(json.loads(r.tags[SEARCH_CONFIG_TAG])) for r in tagged], dict(spec.params)
    )
    for run, draw in zip(tagged, replayed, strict=True):
        if draw is None:
            out.skipped += 1
        else:
            out.trials.append((draw[0], draw[1], [run.metrics[k] for k in keys]))
    if not out.trials:
        raise SelectionError(
            f"{where}: no finished configuration of it lies in this sweep's space ({out.describe()})"
        )
    return out


def warm_storage(spec: SweepSpec, warm: WarmStart):
    """An in-memory Optuna storage holding the study ``OptunaSearch`` will open, with ``warm``'s
    trials completed in it."""
    import optuna

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        directions=["maximize" if m == "max" else "minimize" for m in spec.all_modes],
    )
    study.add_trials(
        optuna.trial.create_trial(params=p, distributions=d, values=v) for p, d, v in warm.trials
    )
    return storage
